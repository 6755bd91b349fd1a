//! Records what the binary was built from, for `openagi_build_info` and
//! `openagi debug bundle`: the git commit (`BUILD_GIT_COMMIT`) and the
//! compiler (`BUILD_RUSTC_VERSION`). Either is "unknown" when it cannot
//! be found out, e.g. a build from a source tarball without git. The names
//! do not start with OPENAGI_: cargo also sets them when it runs tests,
//! and daemons those tests start read OPENAGI_* as settings.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");

    // Cargo hands the compiler it builds with to build scripts as $RUSTC;
    // a new compiler rebuilds everything, this script included.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_RUSTC_VERSION={rustc_version}");

    watch_head();
}

/// Runs git in this package's directory; `None` when git is missing, this
/// is no repository, or git fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// Reruns this script when HEAD moves: HEAD itself (a checkout), the
/// branch it points to (a commit) and packed-refs (`git pack-refs`, or a
/// fresh clone whose branch is only packed). Only existing paths are
/// named, because cargo reruns a script on every build while a path it
/// watches is missing; for a branch that is only packed, its directory is
/// watched, so the loose ref a commit writes there is seen.
fn watch_head() {
    let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) else {
        return;
    };
    watch(&absolute(&head));
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        watch(&absolute(&packed));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &branch])
    {
        let path = absolute(&path);
        if path.exists() {
            watch(&path);
        } else if let Some(dir) = path.parent() {
            watch(dir);
        }
    }
}

/// git prints paths relative to the directory it ran in.
fn absolute(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
