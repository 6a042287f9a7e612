//! Compiles the wire types from `proto/` with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc` install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}");
    let descriptors = protox::compile(["data_service.proto", "bridge.proto", "bridge_v2.proto"], [proto_dir])?;
    prost_build::Config::new()
        // v2 messages are carried as they are: `Bytes` slices, never copied.
        .bytes([".streambridge.v2"])
        .compile_fds(descriptors)?;
    Ok(())
}
