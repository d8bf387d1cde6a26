//! Puts the commit the binary is built from into `EDGETWIN_COMMIT` (shown by `--version`):
//! `$EDGETWIN_COMMIT` when set (a package build from a tarball), else `git rev-parse`, else
//! `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=EDGETWIN_COMMIT");
    let git_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git");
    // A new commit moves HEAD's branch ref (loose or packed); rerun only then.
    for f in ["HEAD", "packed-refs"] {
        println!("cargo:rerun-if-changed={}", git_dir.join(f).display());
    }
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed={}", git_dir.join(r).display());
        }
    }
    let commit = std::env::var("EDGETWIN_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()?;
            let hash = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !hash.is_empty()).then_some(hash)
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGETWIN_COMMIT={commit}");
}
