//! The invariants ARCHITECTURE.md states about the tree, checked on the
//! sources so a change that breaks one fails here, not in review:
//! - the pure crates (`crypto`, `consensus`, `learning`, `mesh`) do no I/O: no
//!   async runtime, network, disk or clock in their dependencies or code;
//! - `node` is split by audience: `common/` imports neither `daemon/` nor
//!   `cli/`, and those two do not import each other;
//! - the product does not link the test harness;
//! - every source path ARCHITECTURE.md names exists, and every workspace
//!   crate has its section there.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `[dependencies]` table of a crate's manifest (not dev-dependencies:
/// tests may use a temporary directory).
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = read(manifest);
    let mut in_deps = false;
    let mut deps = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps
            && !line.starts_with('#')
            && let Some((name, _)) = line.split_once('=')
        {
            deps.push(name.trim().trim_end_matches(".workspace").to_string());
        }
    }
    deps
}

#[test]
fn pure_crates_do_no_io() {
    const IO_CRATES: &[&str] = &[
        "tokio",
        "libp2p",
        "redb",
        "axum",
        "hyper",
        "ureq",
        "tempfile",
        "openagi-net",
        "openagi-keyfiles",
        "openagi-node",
    ];
    const IO_CODE: &[&str] = &[
        "std::fs",
        "File::open",
        "File::create",
        "std::net",
        "tokio",
        "Instant::now",
        "SystemTime::now",
        "thread::sleep",
    ];
    // The one reader of a clock: the `bench crypto` table times the other
    // modules (ARCHITECTURE.md, crypto).
    let allowed = [root().join("crypto/src/bench.rs")];
    let mut found = Vec::new();
    for krate in ["crypto", "consensus", "learning", "mesh"] {
        let dir = root().join(krate);
        for dep in dependencies(&dir.join("Cargo.toml")) {
            if IO_CRATES.contains(&dep.as_str()) {
                found.push(format!("{krate}/Cargo.toml depends on {dep}"));
            }
        }
        for file in rust_files(&dir.join("src")) {
            if allowed.contains(&file) {
                continue;
            }
            let text = read(&file);
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for needle in IO_CODE {
                    if code.contains(needle) {
                        found.push(format!("{}:{}: {needle}", file.display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "I/O in a pure crate:\n{}",
        found.join("\n")
    );
}

#[test]
fn node_layers_import_only_downwards() {
    let src = root().join("node/src");
    // (folder, the `crate::` paths it must not use)
    let rules: [(&str, &[&str]); 3] = [
        ("common", &["crate::daemon", "crate::cli"]),
        ("daemon", &["crate::cli"]),
        ("cli", &["crate::daemon"]),
    ];
    let mut found = Vec::new();
    for (folder, forbidden) in rules {
        let files = rust_files(&src.join(folder));
        assert!(!files.is_empty(), "node/src/{folder} is missing");
        for file in files {
            for (n, line) in read(&file).lines().enumerate() {
                for needle in forbidden {
                    if line.contains(*needle) {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "imports against the layering:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_product_does_not_link_the_test_harness() {
    for krate in [
        "node",
        "net",
        "crypto",
        "consensus",
        "learning",
        "dashboard",
        "keyfiles",
        "mesh",
    ] {
        let deps = dependencies(&root().join(krate).join("Cargo.toml"));
        assert!(
            !deps.iter().any(|d| d == "openagi-tests"),
            "{krate} depends on openagi-tests outside [dev-dependencies]"
        );
    }
}

#[test]
fn architecture_names_paths_that_exist_and_every_crate() {
    let text = read(&root().join("ARCHITECTURE.md"));
    // Paths written out in backquotes, such as `node/src/daemon/http.rs`.
    let mut missing = Vec::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        let looks_like_path = quoted.ends_with(".rs") && quoted.contains("/src/");
        if looks_like_path && !root().join(quoted).exists() {
            missing.push(quoted.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names missing files: {missing:?}"
    );
    // Every workspace member has a `### `name/`` section.
    let manifest = read(&root().join("Cargo.toml"));
    let members = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    for member in members.split('"').skip(1).step_by(2) {
        assert!(
            text.contains(&format!("### `{member}/`")),
            "ARCHITECTURE.md has no section for the {member} crate"
        );
    }
}
