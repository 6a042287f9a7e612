//! Generates the test echo's client from `tests/proto/echo.proto` as a Rust
//! frontend would: tonic-prost-build, client only, no transport.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../tests/proto/echo.proto");
    let descriptors = protox::compile(["echo.proto"], ["../../tests/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
