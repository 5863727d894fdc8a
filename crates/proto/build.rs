//! Compiles `proto/` with a vendored protoc so that no system protoc is needed, and records
//! the commit being built (for `--version` and `agentgate_build_info`).

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
        // Written out with `Bytes` fields (src/header_message.rs): decoded, a header's name
        // and value are slices of the message, not copies.
        .extern_path(".agentgate.v1.Header", "crate::header_message::Header")
        .file_descriptor_set_path(out.join("agentgate_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    record_commit();
    Ok(())
}

/// `AGENTGATE_BUILD_COMMIT` wins (a build from a tarball or in a container without `.git`);
/// otherwise `git rev-parse`, and `unknown` when neither is there.
fn record_commit() {
    println!("cargo:rerun-if-env-changed=AGENTGATE_BUILD_COMMIT");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let git_dir = repo.join(".git");
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the ref it names (a commit).
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            println!(
                "cargo:rerun-if-changed={}",
                git_dir.join(reference).display()
            );
        }
    }
    let commit = std::env::var("AGENTGATE_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(&repo)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=AGENTGATE_BUILD_COMMIT={commit}");
}
