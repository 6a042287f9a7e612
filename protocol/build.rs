//! Compiles the wire types from `proto/` with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc` install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}");
    let descriptors = protox::compile(["data_service.proto", "bridge.proto"], [proto_dir])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
