//! Debian's nginx in a bench: the upstream of `keepalive` (a 64-byte file) and the reference
//! proxy hop of `backends` (`grpc_pass` to the same backend the gateway calls).
//!
//! nginx runs as one process in the foreground (`master_process off`), a child of the bench
//! like every other process in it, so its CPU is read from /proc and it is killed with the
//! bench.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::free_port;
use super::procs::Kid;

/// A running nginx and the address it serves on.
pub struct Nginx {
    pub addr: SocketAddr,
    pub kid: Kid,
}

impl Nginx {
    /// A static 64-byte file at `/`; `None` when nginx is not installed.
    pub async fn serve_file(dir: &Path) -> anyhow::Result<Option<Self>> {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::write(dir.join("www/index.html"), [b'x'; 64])?;
        let root = dir.join("www");
        Self::start(&dir, |addr| {
            format!("server {{ listen {addr}; root {}; }}", root.display())
        })
        .await
    }

    /// A gRPC reverse proxy in front of `backend` (h2c both ways; nginx sends one call at a time
    /// per upstream connection, so it keeps more of them than the bench has calls in flight);
    /// `None` when nginx is not installed.
    pub async fn grpc_hop(dir: &Path, backend: SocketAddr) -> anyhow::Result<Option<Self>> {
        let dir = dir.join("nginx-grpc");
        std::fs::create_dir_all(&dir)?;
        Self::start(&dir, |addr| {
            format!(
                "upstream backend {{ server {backend}; keepalive 256; keepalive_requests 10000000; }} \
                 server {{ listen {addr} http2; location / {{ grpc_pass grpc://backend; }} }}"
            )
        })
        .await
    }

    async fn start(
        dir: &Path,
        server: impl FnOnce(SocketAddr) -> String,
    ) -> anyhow::Result<Option<Self>> {
        let Some(bin) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            return Ok(None);
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let d = dir.display();
        let conf: PathBuf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1; master_process off; daemon off; pid {d}/nginx.pid; \
                 error_log {d}/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; keepalive_requests 10000000; \
                 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; \
                 uwsgi_temp_path {d}; scgi_temp_path {d}; {} }}\n",
                server(addr)
            ),
        )?;
        let error_log = dir.join("error.log");
        let kid = Kid::spawn_program(
            Path::new(bin),
            &[Path::new("-c"), &conf, Path::new("-e"), &error_log],
            &dir.join("stderr.log"),
        )?;
        super::wait_listening(addr, &format!("nginx (see {d}/error.log)")).await?;
        Ok(Some(Self { addr, kid }))
    }
}
