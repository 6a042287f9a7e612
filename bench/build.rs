//! Generates the `DataService` server for the stock-tonic peer exactly as
//! tonic's code generator makes it by default (tonic-prost's codec with its
//! default buffers), from the project's own `proto/`; the messages come from
//! `streambridge-protocol`, as everywhere else.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/data_service.proto");
    let descriptors = protox::compile(["data_service.proto"], ["../proto"])?;
    tonic_prost_build::configure()
        .extern_path(".StreamRequest", "::streambridge_protocol::StreamRequest")
        .extern_path(".StreamResponse", "::streambridge_protocol::StreamResponse")
        .build_client(false)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
