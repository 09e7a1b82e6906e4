//! Build script: the git commit of the build, for `imgw --version` and the start-up log line
//! (`IMGW_GIT_COMMIT`). A build outside a git checkout (a source tarball, a vendored crate,
//! no git installed) gets "unknown" instead of failing.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=IMGW_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a commit, a checkout); these paths work in worktrees too.
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
