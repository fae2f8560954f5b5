//! Helpers for end-to-end tests: find the real binaries, run them, build sample trees.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary built in the same profile as this test
/// (`cargo build --workspace` first; the README's test command does).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

pub struct Run {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `hexz-host` with `args`; never panics on a non-zero exit (tests assert on it).
pub fn hexz_host(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Run {
    let out: Output = Command::new(bin("hexz-host"))
        .args(args.iter().map(|a| a.as_ref()))
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn hexz-host");
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A small project-like tree: sources, a nested directory, a symlink, a hard link.
pub fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/bin")).unwrap();
    std::fs::write(root.join("README.md"), "# sample\n").unwrap();
    std::fs::write(
        root.join("src/main.rs"),
        "fn main() { println!(\"hi\"); }\n".repeat(50),
    )
    .unwrap();
    std::fs::write(root.join("src/bin/tool.rs"), b"// tool\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("blob.bin"), big).unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("main-link")).unwrap();
    std::fs::hard_link(root.join("README.md"), root.join("src/README-again.md")).unwrap();
}
