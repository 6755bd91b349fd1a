//! What this binary is: its version, the git commit and compiler it was
//! built from (recorded by `build.rs`), for `--version`, the
//! `openagi_build_info` metric and debug bundles.

/// The software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (short hash), or "unknown"
/// (see `build.rs`).
pub const GIT_COMMIT: &str = env!("BUILD_GIT_COMMIT");
/// The compiler that built the binary (`rustc --version`), or "unknown".
pub const RUSTC_VERSION: &str = env!("BUILD_RUSTC_VERSION");

/// What this binary was built from, as `openagi_build_info` labels it.
pub fn build_info() -> openagi_dashboard::BuildInfo {
    openagi_dashboard::BuildInfo {
        version: VERSION.to_string(),
        git_commit: GIT_COMMIT.to_string(),
        rustc_version: RUSTC_VERSION.to_string(),
    }
}
