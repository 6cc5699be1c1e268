//! Puts the git commit into `sticky-proxy --version`: sets
//! `STICKY_PROXY_VERSION` to `0.1.0 (1a2b3c4)` for src/cli.rs.
//!
//! `STICKY_PROXY_GIT_COMMIT` from the environment wins (a Docker build or a
//! packager without `.git` can pass it); else `git rev-parse --short HEAD`
//! when this package is the top of a git checkout; else nothing, and the
//! version says "unknown". Cargo reruns this only when HEAD or the branch it
//! points to moves, not on every build.

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "STICKY_PROXY_GIT_COMMIT";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    let commit = match std::env::var(VAR) {
        Ok(c) if !c.trim().is_empty() => Some(c.trim().to_string()),
        _ => from_git(),
    };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = commit.unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=STICKY_PROXY_VERSION={version} ({commit})");
}

/// The short commit of HEAD, if this package is a git checkout's top (not a
/// crate unpacked inside some other repository).
fn from_git() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = git(&manifest_dir, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
        return None;
    }
    // Rerun when HEAD moves: HEAD itself (a checkout), the branch's ref file
    // (a commit) and packed-refs. Only files that exist: cargo reruns a
    // script on every build for a missing one. `.git` may be a file (a
    // worktree), so git says where they are.
    let git_dir = PathBuf::from(git(&manifest_dir, &["rev-parse", "--absolute-git-dir"])?);
    let common = git(&manifest_dir, &["rev-parse", "--git-common-dir"]).map_or(git_dir.clone(), |c| {
        let c = PathBuf::from(c);
        if c.is_absolute() {
            c
        } else {
            manifest_dir.join(c)
        }
    });
    let mut watched = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common.join(branch));
    }
    for file in watched.iter().filter(|f| f.is_file()) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    git(&manifest_dir, &["rev-parse", "--short", "HEAD"])
}

/// `git ARGS` in `dir`: its trimmed output, or `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}
