//! What build is running: one home for the version and commit that `--version`, the gateway's
//! and the agent's `agentgate_build_info` metric report.

/// The workspace version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the binary was built from (12 hex digits), `AGENTGATE_BUILD_COMMIT` when the
/// build set it, or `unknown`.
pub const COMMIT: &str = env!("AGENTGATE_BUILD_COMMIT");

/// `0.1.0 (commit 0123456789ab)`: what `agentgate --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("AGENTGATE_BUILD_COMMIT"),
    ")"
);

/// Adds the `agentgate_build_info` gauge (always 1, the build in its labels) to a scrape.
pub fn add_metric(scrape: &mut crate::exposition::Scrape) {
    scrape
        .family(
            "agentgate_build_info",
            "The running build: its version and commit.",
            crate::exposition::Kind::Gauge,
        )
        .number(
            vec![("version", VERSION.into()), ("commit", COMMIT.into())],
            1.0,
        );
}
