//! The grpc-go job backend of `bench backends`: `grpc_go_backend.go`, built offline from
//! Debian's packaged grpc-go (`golang-go golang-google-grpc-dev`) when they are installed.
//!
//! The hyper backend (`job_backend.rs`) costs about 10 µs per call, less than any real
//! service, so "through the gateway / direct" against it is the worst case of the ratio. A
//! runner's job router is most likely a grpc-go server; this backend shows the ratio against
//! one, in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::procs::Kid;
use super::{free_port, wait_listening};

/// Where Debian's packages put Go library sources (GOPATH layout).
const DEBIAN_GOCODE: &str = "/usr/share/gocode";
const SOURCE: &str = include_str!("grpc_go_backend.go");

/// Why the grpc-go backend cannot be built here, or `None` when it can.
pub fn missing() -> Option<String> {
    let go = Command::new("go").arg("version").output();
    if !go.is_ok_and(|o| o.status.success()) {
        return Some("`go` is not installed (apt-get install golang-go)".into());
    }
    let grpc = Path::new(DEBIAN_GOCODE).join("src/google.golang.org/grpc");
    if !grpc.is_dir() {
        return Some(format!(
            "grpc-go is not in {DEBIAN_GOCODE} (apt-get install golang-google-grpc-dev)"
        ));
    }
    None
}

/// Builds the backend under `dir` and starts it; its output goes to `dir/grpc-go-backend.log`.
pub async fn start(dir: &Path) -> anyhow::Result<(Kid, SocketAddr)> {
    let binary = build(dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let kid = Kid::spawn_program(
        &binary,
        &["--listen", &addr.to_string()],
        &dir.join("grpc-go-backend.log"),
    )?;
    wait_listening(addr, "the grpc-go backend").await?;
    Ok((kid, addr))
}

/// `go build` in GOPATH mode with no network: the module proxy is off and the only library
/// sources are Debian's. The build cache is kept in the system's temporary directory, so a
/// second bench run does not compile grpc-go again.
fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let gopath = dir.join("gopath");
    let app = gopath.join("src/benchjobs");
    std::fs::create_dir_all(&app)?;
    std::fs::write(app.join("main.go"), SOURCE)?;
    let binary = dir.join("grpc-go-backend");
    let cache = std::env::temp_dir().join("agentgate-bench-gocache");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&app)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{DEBIAN_GOCODE}", gopath.display()))
        .env("GOCACHE", cache)
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .output()
        .context("cannot run `go build`")?;
    anyhow::ensure!(
        out.status.success(),
        "`go build` of the grpc-go backend failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(binary)
}
