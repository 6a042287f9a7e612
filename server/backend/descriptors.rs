//! Method descriptors: what turns a method's messages from proto3 JSON into
//! protobuf and back (WebSocket protocol v2, `streambridge.v2.json`).
//!
//! In process they come from the descriptor sets the services were
//! registered with (the built-in `DataService`'s is compiled in). In
//! upstream mode they come from `--descriptor-set FILE` if given, else from
//! the upstream's own reflection, asked once per service and cached:
//! `grpc.reflection.v1` first, `v1alpha` when the upstream has only that
//! (grpcio-reflection serves only v1alpha; remembered for [`MISS_TTL`]).
//!
//! Clients choose the names asked about, so every look-up is bounded
//! (docs/operations.md, "Security"):
//!
//! - a method path over [`MAX_METHOD_PATH`] bytes is refused before any
//!   look-up (INVALID_ARGUMENT);
//! - a service the pool knows answers from the pool alone: an unknown method
//!   of a known service costs no reflection request;
//! - a name reflection did not describe is remembered as a miss for
//!   [`MISS_TTL`], at most [`MAX_MISSES`] of them (so at most
//!   `MAX_MISSES * MAX_METHOD_PATH` bytes); the oldest goes first;
//! - concurrent look-ups of one name share one reflection request;
//! - reflection requests are capped per second
//!   (`--reflection-lookups-per-second`): past it a look-up fails with
//!   UNAVAILABLE and nothing is remembered.
//!
//! What the pool itself holds is the upstream's own schema: files its
//! reflection returned, never a name a client made up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use prost::Message;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::transport::Channel;

/// The longest method path looked up: far past any real one
/// (`/package.Service/Method`), short enough that remembering one costs little.
pub const MAX_METHOD_PATH: usize = 1024;
/// How long a name reflection did not describe (and an upstream without
/// reflection v1) is remembered.
pub const MISS_TTL: Duration = Duration::from_secs(60);
/// How many such names are remembered at most.
pub const MAX_MISSES: usize = 4096;
/// How long one reflection request may take (so look-ups under way are
/// bounded too: at most the rate cap times this).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a method's descriptors come from. Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    pool: Arc<Mutex<DescriptorPool>>,
    /// Asked for services the pool does not know, in upstream mode.
    reflection: Option<Arc<Reflection>>,
}

/// The upstream's reflection, and what the bridge remembers of its answers.
struct Reflection {
    /// Where look-ups run (each its own task, so an abandoned one still finishes).
    tasks: TaskTracker,
    channel: Channel,
    /// Services reflection did not describe, until when.
    misses: Mutex<Misses>,
    /// Look-ups under way, by service: later askers wait for the same answer.
    pending: Mutex<HashMap<String, Lookup>>,
    /// The cap on requests to the upstream.
    rate: Mutex<TokenBucket>,
    /// Until when the upstream is taken to serve only `v1alpha`.
    v1alpha_only_until: Mutex<Option<Instant>>,
}

type Lookup = Shared<BoxFuture<'static, Result<(), Status>>>;

impl Catalog {
    /// A fixed catalog of these encoded `FileDescriptorSet`s.
    pub fn from_sets(sets: &[&[u8]]) -> Result<Catalog, String> {
        let mut pool = DescriptorPool::new();
        for set in sets {
            let set = FileDescriptorSet::decode(*set).map_err(|e| format!("not a FileDescriptorSet: {e}"))?;
            add_new_files(&mut pool, set.file).map_err(|e| e.to_string())?;
        }
        Ok(Catalog {
            pool: Arc::new(Mutex::new(pool)),
            reflection: None,
        })
    }

    /// A catalog that asks the upstream behind `channel` by reflection for
    /// what `sets` (from `--descriptor-set`) do not describe, at most
    /// `lookups_per_second` requests a second.
    pub fn with_reflection(
        sets: &[&[u8]],
        channel: Channel,
        lookups_per_second: u32,
        tasks: TaskTracker,
    ) -> Result<Catalog, String> {
        let mut catalog = Catalog::from_sets(sets)?;
        catalog.reflection = Some(Arc::new(Reflection {
            channel,
            tasks,
            misses: Mutex::new(Misses::default()),
            pending: Mutex::default(),
            rate: Mutex::new(TokenBucket::new(lookups_per_second)),
            v1alpha_only_until: Mutex::new(None),
        }));
        Ok(catalog)
    }

    /// The descriptor of `path` (`/package.Service/Method`). INVALID_ARGUMENT
    /// for a path over [`MAX_METHOD_PATH`]; UNIMPLEMENTED when nothing
    /// describes it; UNAVAILABLE when the upstream could not be asked (or
    /// was asked too often this second).
    pub async fn method(&self, path: &str) -> Result<MethodDescriptor, Status> {
        if path.len() > MAX_METHOD_PATH {
            return Err(Status::invalid_argument(format!(
                "a method path of {} bytes; the longest looked up is {MAX_METHOD_PATH}",
                path.len()
            )));
        }
        let (service, method) = split_path(path)
            .ok_or_else(|| Status::unimplemented(format!("{path:?} is not a method path (/package.Service/Method)")))?;
        match self.lookup(service, method) {
            Known::Method(found) => return Ok(found),
            Known::ServiceOnly => return Err(unknown(path)),
            Known::Nothing => {}
        }
        let Some(reflection) = &self.reflection else {
            return Err(unknown(path));
        };
        reflection.describe(service, &self.pool).await?;
        match self.lookup(service, method) {
            Known::Method(found) => Ok(found),
            Known::ServiceOnly => Err(unknown(path)),
            Known::Nothing => {
                // Reflection answered with files that do not define it (a
                // message type asked as a service): not asked again either.
                reflection.remember_miss(service);
                Err(unknown(path))
            }
        }
    }

    fn lookup(&self, service: &str, method: &str) -> Known {
        let pool = self.pool.lock().expect("not poisoned");
        let Some(service) = pool.get_service_by_name(service) else {
            return Known::Nothing;
        };
        match service.methods().find(|m| m.name() == method) {
            Some(found) => Known::Method(found),
            None => Known::ServiceOnly,
        }
    }
}

/// What the pool says of a method.
enum Known {
    Method(MethodDescriptor),
    /// Its service is described, without this method.
    ServiceOnly,
    Nothing,
}

impl Reflection {
    /// Makes sure the pool holds what the upstream's reflection says of
    /// `service`, asking at most once at a time per name.
    async fn describe(self: &Arc<Self>, service: &str, pool: &Arc<Mutex<DescriptorPool>>) -> Result<(), Status> {
        if let Some(status) = self.misses.lock().expect("not poisoned").get(service) {
            return Err(status);
        }
        let lookup = {
            let mut pending = self.pending.lock().expect("not poisoned");
            match pending.get(service) {
                Some(lookup) => lookup.clone(),
                None => {
                    if !self.rate.lock().expect("not poisoned").take() {
                        return Err(Status::unavailable(format!(
                            "too many descriptor look-ups this second (--reflection-lookups-per-second); \
                             {service} was not asked about"
                        )));
                    }
                    // Its own task, so that it finishes (and leaves
                    // `pending`) even if every caller waiting for it is gone.
                    let asking = self.tasks.spawn(self.clone().ask(service.to_string(), pool.clone()));
                    let lookup = async move {
                        asking
                            .await
                            .unwrap_or_else(|_| Err(Status::internal("the descriptor look-up failed")))
                    }
                    .boxed()
                    .shared();
                    pending.insert(service.to_string(), lookup.clone());
                    lookup
                }
            }
        };
        lookup.await
    }

    /// One look-up: the request, its files into the pool or a miss
    /// remembered, and only then out of `pending` (a caller arriving between
    /// would otherwise find it nowhere and ask again).
    async fn ask(self: Arc<Self>, service: String, pool: Arc<Mutex<DescriptorPool>>) -> Result<(), Status> {
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.fetch_files(&service))
            .await
            .unwrap_or_else(|_| {
                Err(Status::unavailable(format!(
                    "the upstream's reflection did not answer about {service} within {} s",
                    LOOKUP_TIMEOUT.as_secs()
                )))
            });
        let outcome = match answer {
            Ok(files) => add_new_files(&mut pool.lock().expect("not poisoned"), files)
                .map_err(|e| Status::internal(format!("the upstream's descriptors for {service} do not build: {e}"))),
            Err(status) => {
                if status.code() == tonic::Code::Unimplemented {
                    self.remember_miss(&service);
                }
                Err(status)
            }
        };
        self.pending.lock().expect("not poisoned").remove(&service);
        outcome
    }

    fn remember_miss(&self, service: &str) {
        self.misses
            .lock()
            .expect("not poisoned")
            .insert(service, Instant::now());
    }

    /// The files defining `service` and their dependencies: reflection v1,
    /// then v1alpha if v1 is not served (remembered for [`MISS_TTL`]).
    async fn fetch_files(&self, service: &str) -> Result<Vec<FileDescriptorProto>, Status> {
        let v1alpha_only = self
            .v1alpha_only_until
            .lock()
            .expect("not poisoned")
            .is_some_and(|until| Instant::now() < until);
        let answer = if v1alpha_only {
            fetch_v1alpha(self.channel.clone(), service).await
        } else {
            match fetch_v1(self.channel.clone(), service).await {
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    *self.v1alpha_only_until.lock().expect("not poisoned") = Some(Instant::now() + MISS_TTL);
                    fetch_v1alpha(self.channel.clone(), service).await
                }
                other => other,
            }
        };
        answer.map_err(|status| match status.code() {
            tonic::Code::NotFound | tonic::Code::Unimplemented => Status::unimplemented(format!(
                "the upstream's reflection does not describe {service}: {}",
                status.message()
            )),
            _ => Status::unavailable(format!(
                "could not ask the upstream's reflection about {service}: {}",
                status.message()
            )),
        })
    }
}

/// Names reflection did not describe, each until [`MISS_TTL`] after it was
/// asked; at most [`MAX_MISSES`], the oldest dropped first.
#[derive(Default)]
struct Misses {
    since: HashMap<Box<str>, Instant>,
}

impl Misses {
    /// The status for `service` if it is a miss still remembered.
    fn get(&self, service: &str) -> Option<Status> {
        let asked = self.since.get(service)?;
        (asked.elapsed() < MISS_TTL).then(|| {
            Status::unimplemented(format!(
                "the upstream's reflection does not describe {service} (asked {} s ago)",
                asked.elapsed().as_secs()
            ))
        })
    }

    fn insert(&mut self, service: &str, now: Instant) {
        if self.since.len() >= MAX_MISSES && !self.since.contains_key(service) {
            // Rare (every insert follows a rate-limited request), so a scan is fine.
            self.since.retain(|_, asked| asked.elapsed() < MISS_TTL);
            if self.since.len() >= MAX_MISSES
                && let Some(oldest) = self
                    .since
                    .iter()
                    .min_by_key(|(_, asked)| **asked)
                    .map(|(name, _)| name.clone())
            {
                self.since.remove(&oldest);
            }
        }
        self.since.insert(service.into(), now);
    }
}

/// `per_second` requests a second, in bursts of up to `per_second`.
struct TokenBucket {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.per_second);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn unknown(path: &str) -> Status {
    Status::unimplemented(format!("unknown method {path}"))
}

/// `("package.Service", "Method")` of `/package.Service/Method`.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// Adds the files the pool does not have yet (reflection answers repeat
/// shared dependencies such as `google/protobuf/*.proto`).
fn add_new_files(
    pool: &mut DescriptorPool,
    files: Vec<FileDescriptorProto>,
) -> Result<(), prost_reflect::DescriptorError> {
    let new: Vec<_> = files
        .into_iter()
        .filter(|file| pool.get_file_by_name(file.name()).is_none())
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    pool.add_file_descriptor_set(FileDescriptorSet { file: new })
}

/// One reflection question and its answer, for either version (their
/// messages are the same shape in two packages).
macro_rules! fetch_with {
    ($name:ident, $pb:path) => {
        async fn $name(channel: Channel, service: &str) -> Result<Vec<FileDescriptorProto>, Status> {
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use $pb as pb;
            let mut client = pb::server_reflection_client::ServerReflectionClient::new(channel);
            let request = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(service.to_string())),
            };
            let mut answers = client
                .server_reflection_info(futures_util::stream::iter([request]))
                .await?
                .into_inner();
            let answer = answers
                .message()
                .await?
                .ok_or_else(|| Status::unavailable("the reflection stream ended without an answer"))?;
            match answer.message_response {
                Some(MessageResponse::FileDescriptorResponse(files)) => files
                    .file_descriptor_proto
                    .iter()
                    .map(|bytes| {
                        FileDescriptorProto::decode(&bytes[..])
                            .map_err(|e| Status::internal(format!("reflection sent an undecodable file: {e}")))
                    })
                    .collect(),
                Some(MessageResponse::ErrorResponse(error)) => Err(Status::new(
                    tonic::Code::from_i32(error.error_code),
                    error.error_message,
                )),
                _ => Err(Status::internal("reflection answered something else than files")),
            }
        }
    };
}

fetch_with!(fetch_v1, tonic_reflection::pb::v1);
fetch_with!(fetch_v1alpha, tonic_reflection::pb::v1alpha);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_capped_oldest_first_and_expire() {
        let mut misses = Misses::default();
        let start = Instant::now();
        for i in 0..MAX_MISSES + 10 {
            misses.insert(&format!("s{i}"), start + Duration::from_millis(i as u64));
        }
        assert_eq!(misses.since.len(), MAX_MISSES);
        assert!(misses.get("s0").is_none(), "the oldest went first");
        assert!(misses.get(&format!("s{}", MAX_MISSES + 9)).is_some());
        misses.insert("old", start - MISS_TTL);
        assert!(misses.get("old").is_none(), "expired");
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_refills_with_time() {
        let mut bucket = TokenBucket::new(3);
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 3);
        bucket.refilled -= Duration::from_secs(1);
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 3);
    }

    #[tokio::test]
    async fn the_built_in_service_is_described_and_unknown_methods_are_unimplemented() {
        let catalog = Catalog::from_sets(&[crate::backend::health::FILE_DESCRIPTOR_SET]).unwrap();
        let method = catalog.method("/DataService/BidirectionalStream").await.unwrap();
        assert_eq!(method.input().full_name(), "StreamRequest");
        assert!(method.is_client_streaming() && method.is_server_streaming());
        for path in [
            "/DataService/Nope",
            "/nope.Service/M",
            "DataService/BidirectionalStream",
            "/x",
        ] {
            let status = catalog.method(path).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
        }
    }
}
