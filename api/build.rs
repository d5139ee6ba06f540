//! Compile `proto/tollgate.proto` with protox (pure Rust: no `protoc` on the build machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tollgate.proto");
    let fds = protox::compile(["proto/tollgate.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
