//! Compiles the public contract `proto/custody/v1/custody.proto` with `protox` (a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) and generates the tonic services.
//! The encoded file descriptor set is written to `OUT_DIR` for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/custody/v1/custody.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("custody_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
