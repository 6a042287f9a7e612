//! What one accepted connection owes the server, whatever its protocol:
//!
//! - **a first request in time**: from accept, the client has
//!   `--http1-header-read-timeout` to finish the TLS handshake and send a
//!   complete request head, or the HTTP/2 preface and its SETTINGS frame.
//!   Until then hyper-util is still sniffing the protocol version (or h2 is
//!   waiting for SETTINGS) and neither has a timer of its own, so without this
//!   a client that connects and sends nothing would hold a `--max-connections`
//!   slot for good;
//! - **a request now and then**: a connection with no request in progress for
//!   `--connection-idle-timeout` is wound down gracefully (HTTP/2 GOAWAY).
//!   A call in progress, however quiet, is never idle.
//!
//! - **a clean close**: a closing connection reads on until its peer closes
//!   too (at most a second), so that the kernel never answers the peer's
//!   last bytes with RST and destroys what the peer had not read yet.
//!
//! [`Activity`] keeps the count; [`WatchedIo`] notices the HTTP/2 handshake in
//! the bytes it reads, [`TrackRequests`] notices requests and their ends (a
//! request lasts until its response body is finished or dropped). Only
//! per-connection state is touched, once per request, never per message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

/// Why a connection's watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No request head (nor HTTP/2 handshake) within the header timeout:
    /// close at once, there is nothing to wind down.
    NoRequest,
    /// No request in progress for the idle timeout: wind down gracefully.
    Idle,
}

/// Requests in progress on one connection, and when that last changed.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    /// A request head, or the HTTP/2 preface and SETTINGS, has arrived.
    established: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `accepted` of the last request start or end.
    last_change_ms: AtomicU64,
    /// Woken when the connection is established or its last request ends.
    changed: Notify,
}

impl Activity {
    /// The activity of a connection accepted just now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            accepted: Instant::now(),
            established: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    /// `after` the connection was accepted.
    pub fn deadline(&self, after: Duration) -> Instant {
        self.accepted + after
    }

    fn establish(&self) {
        // Idleness counts from here, not from accept: the handshake may have
        // taken most of the header timeout.
        self.touch();
        if !self.established.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    fn touch(&self) {
        let elapsed = self.accepted.elapsed().as_millis();
        // fetch_max: a thread preempted between reading the clock and storing
        // must not move the last change back in time.
        self.last_change_ms
            .fetch_max(u64::try_from(elapsed).unwrap_or(u64::MAX), Ordering::AcqRel);
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        self.establish();
        InFlight(self.clone())
    }

    /// Resolves when the connection owes something it did not deliver:
    /// a first request by `accepted + header_timeout`, or any request in
    /// progress within `idle_timeout` of the last one's end.
    pub async fn expired(&self, header_timeout: Duration, idle_timeout: Duration) -> Expiry {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the state is read, so no wake-up falls between.
            changed.as_mut().enable();
            if !self.established.load(Ordering::Acquire) {
                tokio::select! {
                    () = sleep_until(self.accepted + header_timeout) => {
                        if !self.established.load(Ordering::Acquire) {
                            return Expiry::NoRequest;
                        }
                    }
                    () = changed => {}
                }
            } else if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
            } else {
                let since = self.last_change_ms.load(Ordering::Acquire);
                let deadline = self.accepted + Duration::from_millis(since) + idle_timeout;
                tokio::select! {
                    () = sleep_until(deadline) => {
                        let quiet = self.in_flight.load(Ordering::Acquire) == 0
                            && self.last_change_ms.load(Ordering::Acquire) == since;
                        if quiet {
                            return Expiry::Idle;
                        }
                    }
                    () = changed => {}
                }
            }
        }
    }
}

/// One request in progress; its drop ends it.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// A connection's byte stream, watched for the end of the HTTP/2 handshake
/// (the client's preface and first SETTINGS frame). After that, or as soon
/// as the bytes are not HTTP/2, reads pass straight through.
pub struct WatchedIo<I> {
    io: I,
    handshake: H2Handshake,
    activity: Arc<Activity>,
    /// Once the sending side is closed: until when to read on.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WatchedIo<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        WatchedIo {
            io,
            handshake: H2Handshake::default(),
            activity,
            linger: None,
        }
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_FRAME_HEADER: usize = 9;
const H2_SETTINGS: u8 = 0x4;

/// How far a client has come through the HTTP/2 handshake (RFC 9113 3.4:
/// the preface, then a SETTINGS frame, must come first).
#[derive(Debug)]
enum H2Handshake {
    /// This many bytes of the preface have matched.
    Preface(usize),
    /// This many bytes of the first frame's header have arrived.
    FrameHeader { header: [u8; H2_FRAME_HEADER], have: usize },
    /// This many bytes of the SETTINGS payload are still to come.
    SettingsPayload(usize),
    /// Done, or not HTTP/2: nothing more to watch.
    Over,
}

impl Default for H2Handshake {
    fn default() -> Self {
        H2Handshake::Preface(0)
    }
}

impl H2Handshake {
    /// Follows the handshake through `bytes`; true when it completed in them.
    fn advance(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self {
                H2Handshake::Over => return false,
                H2Handshake::Preface(matched) => {
                    let want = &H2_PREFACE[*matched..];
                    let n = want.len().min(bytes.len());
                    if bytes[..n] != want[..n] {
                        // HTTP/1: its first request head establishes it.
                        *self = H2Handshake::Over;
                        return false;
                    }
                    *matched += n;
                    bytes = &bytes[n..];
                    if *matched == H2_PREFACE.len() {
                        *self = H2Handshake::FrameHeader {
                            header: [0; H2_FRAME_HEADER],
                            have: 0,
                        };
                    }
                }
                H2Handshake::FrameHeader { header, have } => {
                    let n = (H2_FRAME_HEADER - *have).min(bytes.len());
                    header[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == H2_FRAME_HEADER {
                        if header[3] != H2_SETTINGS {
                            // Not a valid handshake: h2 itself will refuse it.
                            *self = H2Handshake::Over;
                            return false;
                        }
                        let length =
                            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                        *self = H2Handshake::SettingsPayload(length);
                    }
                }
                H2Handshake::SettingsPayload(_) => {}
            }
            if let H2Handshake::SettingsPayload(remaining) = self {
                let n = (*remaining).min(bytes.len());
                *remaining -= n;
                bytes = &bytes[n..];
                if *remaining == 0 {
                    *self = H2Handshake::Over;
                    return true;
                }
            }
        }
        false
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if !matches!(this.handshake, H2Handshake::Over) && this.handshake.advance(&buf.filled()[before..]) {
            this.activity.establish();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Closes the sending side, then lingers: reads and drops what the peer
    /// still sends until it closes too, for at most [`LINGER`]. Closing a
    /// socket with unread bytes in it makes the kernel answer with RST, and
    /// a peer that gets RST may lose what it had not read yet: the replies
    /// and status of its last calls (a grpcio client still sending at a
    /// drain saw "Stream removed" instead of UNAVAILABLE). nginx's
    /// `lingering_close` does the same.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let linger = this.linger.as_mut().expect("set above");
        let mut scratch = [0u8; 2048];
        loop {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The peer closed too, or the socket failed: nothing is left to lose.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// How long a closing connection reads on, waiting for its peer to close
/// too (see [`WatchedIo`]'s `poll_shutdown`). A peer that saw our FIN closes
/// within a round trip; this bounds one that does not.
const LINGER: Duration = Duration::from_secs(1);

/// A service that counts its requests in a connection's [`Activity`]: each
/// from its call until its response body ends (or is dropped).
#[derive(Clone)]
pub struct TrackRequests<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> TrackRequests<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        TrackRequests { inner, activity }
    }
}

impl<S, B> tower::Service<Request<B>> for TrackRequests<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Tracked {
            in_flight: Some(self.activity.request_started()),
            response: self.inner.call(request),
        }
    }
}

/// The response future of [`TrackRequests`].
pub struct Tracked<F> {
    in_flight: Option<InFlight>,
    response: F,
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response<Body>, E>> + Unpin,
{
    type Output = Result<Response<Body>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(Pin::new(&mut self.response).poll(cx))?;
        let in_flight = self.in_flight.take();
        Poll::Ready(Ok(response.map(|body| {
            Body::new(InFlightBody {
                body,
                _in_flight: in_flight,
            })
        })))
    }
}

/// A response body that keeps its request counted until it is done.
struct InFlightBody {
    body: Body,
    _in_flight: Option<InFlight>,
}

impl http_body::Body for InFlightBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut frame = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            H2_SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        frame.resize(H2_FRAME_HEADER + payload, 0);
        frame
    }

    #[test]
    fn the_h2_handshake_completes_with_the_preface_and_settings_in_any_split() {
        let mut whole = H2_PREFACE.to_vec();
        whole.extend(settings_frame(12));
        for split in 0..whole.len() {
            let mut handshake = H2Handshake::default();
            let first = handshake.advance(&whole[..split]);
            let second = handshake.advance(&whole[split..]);
            assert!(!first && second, "split at {split}");
        }
        let mut one_by_one = H2Handshake::default();
        let done: Vec<bool> = whole.iter().map(|b| one_by_one.advance(&[*b])).collect();
        assert_eq!(done.iter().filter(|d| **d).count(), 1);
        assert!(done[whole.len() - 1]);
    }

    #[test]
    fn a_partial_preface_or_missing_settings_does_not_complete_the_handshake() {
        let mut handshake = H2Handshake::default();
        assert!(!handshake.advance(&H2_PREFACE[..10]));
        assert!(!handshake.advance(&H2_PREFACE[10..]));
        assert!(!handshake.advance(&settings_frame(6)[..9]), "header without payload");
        let mut empty_settings = H2Handshake::default();
        assert!(!empty_settings.advance(H2_PREFACE));
        assert!(
            empty_settings.advance(&settings_frame(0)),
            "a SETTINGS frame without settings counts"
        );
        let mut not_settings = H2Handshake::default();
        assert!(!not_settings.advance(H2_PREFACE));
        let mut ping = settings_frame(8);
        ping[3] = 0x6;
        assert!(!not_settings.advance(&ping), "another first frame does not establish");
        assert!(matches!(not_settings, H2Handshake::Over));
        let mut http1 = H2Handshake::default();
        assert!(!http1.advance(b"GET / HTTP/1.1\r\n"));
        assert!(matches!(http1, H2Handshake::Over));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_expires_after_the_header_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        let expiry = activity.expired(Duration::from_secs(2), Duration::from_secs(60)).await;
        assert_eq!(expiry, Expiry::NoRequest);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_idle_wait_restarts_it_from_its_end() {
        let activity = Activity::new();
        drop(activity.request_started());
        let watch = activity.expired(Duration::from_secs(1), Duration::from_secs(10));
        let mut watch = std::pin::pin!(watch);
        tokio::select! {
            expiry = &mut watch => panic!("expired early: {expiry:?}"),
            () = tokio::time::sleep(Duration::from_secs(6)) => {}
        }
        drop(activity.request_started());
        let ended = Instant::now();
        assert_eq!(watch.await, Expiry::Idle);
        assert_eq!(ended.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle_and_idleness_counts_from_its_end() {
        let activity = Activity::new();
        let request = activity.request_started();
        let watch = activity.expired(Duration::from_secs(1), Duration::from_secs(10));
        let mut watch = std::pin::pin!(watch);
        tokio::select! {
            expiry = &mut watch => panic!("expired with a request in progress: {expiry:?}"),
            () = tokio::time::sleep(Duration::from_secs(100)) => {}
        }
        let ended = Instant::now();
        drop(request);
        assert_eq!(watch.await, Expiry::Idle);
        assert_eq!(ended.elapsed(), Duration::from_secs(10));
    }
}
