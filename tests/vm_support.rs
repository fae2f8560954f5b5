//! What the VM tests (`vm_run.rs`, `vm_template.rs`) share: a packed sample workspace
//! with a private TMPDIR, `hexz-host run` on it, and the check that nothing of a
//! finished run is left.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::{bin, hexz_host, sample_tree};

/// A packed sample workspace and a private TMPDIR, so leftovers are visible.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub snapshot: PathBuf,
    pub tmp: PathBuf,
    /// Pass `-q` to `run` (otherwise it says whether it restored or booted).
    pub quiet: bool,
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        sample_tree(&tree);
        let snapshot = dir.path().join("ws.hxz");
        let packed = hexz_host(&[&"pack", &tree, &"-o", &snapshot]);
        assert_eq!(packed.status, 0, "pack: {}", packed.stderr);
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("mkdir tmp");
        Workspace {
            dir,
            snapshot,
            tmp,
            quiet: true,
        }
    }

    /// A workspace whose runs print what `run` says (no `-q`).
    pub fn verbose() -> Workspace {
        Workspace {
            quiet: false,
            ..Workspace::new()
        }
    }

    /// `hexz-host run` on the workspace with `extra` options, running `command`.
    pub fn run_cmd_os(&self, extra: &[&dyn AsRef<OsStr>], command: &[&str]) -> Command {
        let mut c = Command::new(bin("hexz-host"));
        c.arg("run");
        if self.quiet {
            c.arg("-q");
        }
        c.arg(&self.snapshot)
            .args(extra.iter().map(|a| a.as_ref()))
            .arg("--")
            .args(command)
            .env("TMPDIR", &self.tmp)
            .env_remove("RUST_LOG");
        c
    }

    pub fn run_cmd(&self, extra: &[&str], command: &[&str]) -> Command {
        let extra: Vec<&dyn AsRef<OsStr>> = extra.iter().map(|a| a as _).collect();
        self.run_cmd_os(&extra, command)
    }

    /// Runs to the end with `stdin` fed to the command.
    pub fn run_os(&self, extra: &[&dyn AsRef<OsStr>], command: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .run_cmd_os(extra, command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hexz-host run");
        let mut input = child.stdin.take().expect("stdin");
        let bytes = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&bytes);
        });
        let out = child.wait_with_output().expect("wait hexz-host run");
        let _ = feeder.join();
        out
    }

    pub fn run(&self, extra: &[&str], command: &[&str], stdin: &[u8]) -> Output {
        let extra: Vec<&dyn AsRef<OsStr>> = extra.iter().map(|a| a as _).collect();
        self.run_os(&extra, command, stdin)
    }

    /// Nothing of a finished run is left: no temporary files, no process using them.
    pub fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.tmp)
            .expect("read tmp")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
        let needle = self.tmp.to_string_lossy().into_owned();
        for proc_dir in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(cmdline) = std::fs::read(proc_dir.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(&needle),
                "a process of the run is still alive: {cmdline}"
            );
        }
    }
}

impl Default for Workspace {
    fn default() -> Workspace {
        Workspace::new()
    }
}

/// Asserts a run failed as a sandbox failure (exit 125) whose stderr says `says`.
pub fn assert_refused(out: &Output, says: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(err.contains(says), "expected {says:?} in: {err}");
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
