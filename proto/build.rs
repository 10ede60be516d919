//! Compiles the project's protos with the vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Tensor payloads stay `bytes::Bytes` so they are sliced, not copied.
        .bytes(".")
        .compile_with_config(
            config,
            &["proto/grpc_predict_v2.proto", "proto/rankway_worker_v1.proto"],
            &["proto"],
        )?;
    Ok(())
}
