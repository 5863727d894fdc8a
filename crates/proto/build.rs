//! Compiles `proto/` with a vendored protoc so that no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("agentgate/v1/agent.proto"),
        root.join("agentgate/v1/tunnel.proto"),
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .bytes(".agentgate.v1.Chunk.data")
        .bytes(".agentgate.v1.ResponseHead.body")
        .file_descriptor_set_path(out.join("agentgate_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
