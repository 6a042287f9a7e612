//! Compiles the gRPC service of `proto/data_service.proto` (tonic server and
//! client) with a pure-Rust protobuf compiler (protox): no `protoc` needed.
//!
//! The messages themselves come from the `streambridge-protocol` crate, which
//! the WASM client shares, so each proto type exists exactly once. It also
//! writes the encoded descriptor set of `proto/` for server reflection.
//!
//! Two more protos are compiled for the package's other targets: the test
//! upstream of `tests/proto/` and the chat room of `examples/chat/`. The
//! library never includes them.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=tests/proto");
    println!("cargo:rerun-if-changed=examples/chat/chat.proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(["data_service.proto"], ["proto"])?;
    // Server reflection serves the descriptors of every proto file.
    let all = protox::compile(["data_service.proto", "bridge.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("streambridge_descriptor.bin"),
        prost::Message::encode_to_vec(&all),
    )?;
    tonic_prost_build::configure()
        .extern_path(".StreamRequest", "::streambridge_protocol::StreamRequest")
        .extern_path(".StreamResponse", "::streambridge_protocol::StreamResponse")
        // The library uses tonic's channel only for an upstream; tests connect their own.
        .build_transport(false)
        // Small per-stream buffers: see server/backend/codec.rs.
        .codec_path("crate::backend::codec::LeanCodec")
        .compile_fds(descriptors)?;

    for (proto, include, descriptor_file) in [
        ("echo.proto", "tests/proto", "echo_descriptor.bin"),
        ("chat.proto", "examples/chat", "chat_descriptor.bin"),
    ] {
        let descriptors = protox::compile([proto], [include])?;
        std::fs::write(
            out_dir.join(descriptor_file),
            prost::Message::encode_to_vec(&descriptors),
        )?;
        tonic_prost_build::configure().compile_fds(descriptors)?;
    }
    Ok(())
}
