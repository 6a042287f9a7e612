//! Method descriptors: what turns a method's messages from proto3 JSON into
//! protobuf and back (WebSocket protocol v2, `streambridge.v2.json`).
//!
//! In process they come from the descriptor sets the services were
//! registered with (the built-in `DataService`'s is compiled in). In
//! upstream mode they come from `--descriptor-set FILE` if given, else from
//! the upstream's own reflection, asked once per service and cached:
//! `grpc.reflection.v1` first, `v1alpha` when the upstream has only that
//! (grpcio-reflection serves only v1alpha).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prost::Message;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tonic::Status;
use tonic::transport::Channel;

/// Where a method's descriptors come from. Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    pool: Arc<Mutex<DescriptorPool>>,
    /// Asked for services the pool does not know, in upstream mode.
    reflection: Option<Channel>,
    /// Services the upstream's reflection does not describe: not asked again.
    undescribed: Arc<Mutex<HashSet<String>>>,
}

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
            undescribed: Arc::default(),
        })
    }

    /// A catalog that asks the upstream behind `channel` by reflection for
    /// what `sets` (from `--descriptor-set`) do not describe.
    pub fn with_reflection(sets: &[&[u8]], channel: Channel) -> Result<Catalog, String> {
        let mut catalog = Catalog::from_sets(sets)?;
        catalog.reflection = Some(channel);
        Ok(catalog)
    }

    /// The descriptor of `path` (`/package.Service/Method`). UNIMPLEMENTED
    /// when nothing describes it; UNAVAILABLE when the upstream could not be
    /// asked.
    pub async fn method(&self, path: &str) -> Result<MethodDescriptor, Status> {
        let (service, method) = split_path(path)
            .ok_or_else(|| Status::unimplemented(format!("{path:?} is not a method path (/package.Service/Method)")))?;
        if let Some(found) = self.lookup(service, method) {
            return Ok(found);
        }
        let Some(channel) = &self.reflection else {
            return Err(unknown(path));
        };
        if self.undescribed.lock().expect("not poisoned").contains(service) {
            return Err(unknown(path));
        }
        let files = match fetch_files(channel.clone(), service).await {
            Ok(files) => files,
            Err(status) => {
                if status.code() == tonic::Code::Unimplemented {
                    self.undescribed
                        .lock()
                        .expect("not poisoned")
                        .insert(service.to_string());
                }
                return Err(status);
            }
        };
        {
            let mut pool = self.pool.lock().expect("not poisoned");
            add_new_files(&mut pool, files)
                .map_err(|e| Status::internal(format!("the upstream's descriptors for {service} do not build: {e}")))?;
        }
        self.lookup(service, method).ok_or_else(|| unknown(path))
    }

    fn lookup(&self, service: &str, method: &str) -> Option<MethodDescriptor> {
        let pool = self.pool.lock().expect("not poisoned");
        pool.get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method)
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

/// The files defining `service` and their dependencies, by the upstream's
/// reflection: v1, then v1alpha if v1 is not served.
async fn fetch_files(channel: Channel, service: &str) -> Result<Vec<FileDescriptorProto>, Status> {
    match fetch_v1(channel.clone(), service).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => fetch_v1alpha(channel, service).await,
        other => other,
    }
    .map_err(|status| match status.code() {
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

    #[tokio::test]
    async fn the_built_in_service_is_described_and_unknown_methods_are_unimplemented() {
        let catalog = Catalog::from_sets(&[crate::ops::health::FILE_DESCRIPTOR_SET]).unwrap();
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
