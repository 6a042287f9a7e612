//! WebTransport for tests: a server with `--webtransport-listen` and a
//! certificate made here (ECDSA P-256, 13 days: what WebTransport's
//! certificate hashes allow), and wtransport's own client. The stream frames
//! of docs/protocol-v2.md §12 are written here from the spec, not from the
//! server's code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use streambridge::Config;
use tokio::io::AsyncWriteExt;
use wtransport::endpoint::ConnectOptions;
use wtransport::error::ConnectingError;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, Identity};

use super::{TestServer, within};

/// A frame's kinds (§12).
pub const BATCH: u8 = 0;
pub const CLOSE: u8 = 1;

/// A server with WebTransport on, and what a client needs to trust it.
pub struct WtServer {
    pub server: TestServer,
    pub udp: SocketAddr,
    pub hash: Sha256Digest,
    dir: PathBuf,
}

impl Drop for WtServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate for a WebTransport server, in files, with its hash.
pub struct WtCert {
    pub hash: Sha256Digest,
    cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

/// A fresh certificate (ECDSA P-256, valid 13 days from now).
pub async fn cert() -> WtCert {
    static CERTS: AtomicUsize = AtomicUsize::new(0);
    let identity = Identity::self_signed_builder()
        .subject_alt_names(["localhost", "127.0.0.1"])
        .from_now_utc()
        .validity_days(13)
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "streambridge-wt-{}-{}",
        std::process::id(),
        CERTS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // Not wtransport's `store_pemfile`: it does not flush its tokio file, so
    // a server reading the file at once may find it empty.
    let chain: String = identity
        .certificate_chain()
        .as_slice()
        .iter()
        .map(|c| c.to_pem())
        .collect();
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&key, identity.private_key().to_secret_pem()).unwrap();
    let hash = identity.certificate_chain().as_slice()[0].hash();
    WtCert { hash, cert, key, dir }
}

impl WtCert {
    /// TLS with this certificate, and WebTransport on an ephemeral UDP port.
    pub fn configure(&self, config: &mut Config) {
        config.tls_cert = Some(self.cert.clone());
        config.tls_key = Some(self.key.clone());
        config.webtransport_listen = Some("127.0.0.1:0".parse().unwrap());
    }
}

/// Starts a server with `--webtransport-listen 127.0.0.1:0` and a fresh
/// certificate; `adjust` changes the rest of its configuration.
pub async fn start(adjust: impl FnOnce(&mut Config)) -> WtServer {
    let cert = cert().await;
    let server = TestServer::start_with(|config| {
        cert.configure(config);
        adjust(config);
    })
    .await;
    WtServer::new(server, cert)
}

impl WtServer {
    /// `server`, started with `cert` configured.
    pub fn new(server: TestServer, cert: WtCert) -> WtServer {
        let udp = server.webtransport.expect("WebTransport is on");
        WtServer {
            server,
            udp,
            hash: cert.hash,
            dir: cert.dir,
        }
    }

    /// A session at `path_and_query` (`/ws?protocol=…`) with `headers`.
    pub async fn session(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Result<Connection, ConnectingError> {
        let config = ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([self.hash.clone()])
            .build();
        let endpoint = Endpoint::client(config).unwrap();
        let mut options = ConnectOptions::builder(format!("https://127.0.0.1:{}{path_and_query}", self.udp.port()));
        for (name, value) in headers {
            options = options.add_header(*name, *value);
        }
        within("WebTransport session", endpoint.connect(options.build())).await
    }

    /// A proto session every test may use.
    pub async fn proto_session(&self) -> Connection {
        self.session("/ws?protocol=streambridge.v2.proto", &[])
            .await
            .expect("the session opens")
    }
}

impl WtServer {
    /// The code and reason of a session the server refuses, as a client
    /// reads them: the CLOSE frame on the session's control stream. Then
    /// the client closes the session, as a client told why does.
    pub async fn refusal(&self, path_and_query: &str, headers: &[(&str, &str)]) -> (u32, String) {
        let connection = self
            .session(path_and_query, headers)
            .await
            .unwrap_or_else(|error| panic!("{path_and_query}: the session is accepted, to be told why: {error}"));
        let mut control = within("the control stream", connection.accept_uni())
            .await
            .expect("the server opens it");
        let (kind, payload) = control_frame(&mut control).await;
        assert_eq!(kind, CLOSE, "{path_and_query}: the first frame is a CLOSE");
        let (code, reason) = payload.split_at(2);
        connection.close(wtransport::VarInt::from_u32(0), b"told why");
        (
            u32::from(u16::from_be_bytes([code[0], code[1]])),
            String::from_utf8(reason.to_vec()).expect("a UTF-8 reason"),
        )
    }
}

/// The next frame on a control stream: its kind and payload.
pub async fn control_frame(control: &mut wtransport::RecvStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    within(
        "a frame on the control stream",
        tokio::io::AsyncReadExt::read_exact(control, &mut header),
    )
    .await
    .expect("a frame");
    let length = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; length - 1];
    tokio::io::AsyncReadExt::read_exact(control, &mut payload)
        .await
        .unwrap();
    (header[4], payload)
}

/// One bidirectional stream: frames out and in.
pub struct WtStream {
    send: wtransport::SendStream,
    recv: wtransport::RecvStream,
    buffer: BytesMut,
    /// The stream error code, once the server reset the stream.
    pub reset: Option<u64>,
}

/// What a stream brought.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Batch(Bytes),
    Close(u16, String),
}

impl WtStream {
    pub async fn open(connection: &Connection) -> WtStream {
        let (send, recv) = within("open a stream", async { connection.open_bi().await.unwrap().await })
            .await
            .expect("a stream opens");
        WtStream {
            send,
            recv,
            buffer: BytesMut::new(),
            reset: None,
        }
    }

    /// Writes one frame of `kind` with `payload`.
    pub async fn write_frame(&mut self, kind: u8, payload: &[u8]) {
        let mut frame = BytesMut::with_capacity(5 + payload.len());
        frame.put_u32(payload.len() as u32 + 1);
        frame.put_u8(kind);
        frame.put_slice(payload);
        within("write a frame", self.send.write_all(&frame))
            .await
            .expect("write");
    }

    /// Writes bytes as they are (a broken frame, for abuse tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        within("write", self.send.write_all(bytes)).await.expect("write");
    }

    /// The next frame; `None` once the server finished the stream.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buffer.len() >= 4 {
                let length = u32::from_be_bytes(self.buffer[..4].try_into().unwrap()) as usize;
                if self.buffer.len() >= 4 + length {
                    self.buffer.advance(4);
                    let mut frame = self.buffer.split_to(length).freeze();
                    return Some(match frame.get_u8() {
                        BATCH => Frame::Batch(frame),
                        CLOSE => {
                            let code = frame.get_u16();
                            Frame::Close(code, String::from_utf8(frame.to_vec()).expect("a UTF-8 reason"))
                        }
                        kind => panic!("unknown frame kind {kind}"),
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match within("read the stream", self.recv.read(&mut chunk)).await {
                Ok(Some(n)) => self.buffer.extend_from_slice(&chunk[..n]),
                Ok(None) => return None,
                Err(wtransport::error::StreamReadError::Reset(code)) => {
                    self.reset = Some(code.into_inner());
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Ends the client's side of the stream (it sends nothing more).
    pub async fn finish(&mut self) {
        let _ = self.send.shutdown().await;
    }

    /// Abandons the stream both ways, as a page's `abort` does.
    pub fn reset(mut self, code: u32) {
        let _ = self.send.reset(wtransport::VarInt::from_u32(code));
        self.recv.stop(wtransport::VarInt::from_u32(code));
    }
}
