//! Compiles the gRPC service of `proto/data_service.proto` (tonic server and
//! client) with a pure-Rust protobuf compiler (protox): no `protoc` needed.
//!
//! The messages themselves come from the `streambridge-protocol` crate, which
//! the WASM client shares, so each proto type exists exactly once. It also
//! writes the encoded descriptor set of `proto/` for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["data_service.proto"], ["proto"])?;
    // Server reflection serves the descriptors of every proto file.
    let all = protox::compile(["data_service.proto", "bridge.proto"], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("streambridge_descriptor.bin"),
        prost::Message::encode_to_vec(&all),
    )?;
    tonic_prost_build::configure()
        .extern_path(".StreamRequest", "::streambridge_protocol::StreamRequest")
        .extern_path(".StreamResponse", "::streambridge_protocol::StreamResponse")
        // The library enables only tonic's server half; tests connect their own channel.
        .build_transport(false)
        // Small per-stream buffers: see server/backend/codec.rs.
        .codec_path("crate::backend::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
