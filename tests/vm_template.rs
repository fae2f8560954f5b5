//! Memory templates end to end, in real QEMU (TCG here): `hexz-host template build`
//! saves a booted guest, `hexz-host run --template` restores it and runs the command as
//! a cold `run` does. Needs what `vm_run.rs` needs; without it each test says why and
//! passes — unless `CI` is set, where it fails.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use hexz_e2e::vm_support::{assert_refused, text, Workspace};
use hexz_e2e::{bin, hexz_host};

/// The template every test restores (built once per process), or why VMs cannot run.
fn template() -> Result<&'static Path, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let on_path = |name: &str| {
                std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
                    .unwrap_or(false)
            };
            if !on_path("qemu-system-x86_64") {
                return Err("qemu-system-x86_64 is not installed".into());
            }
            let built = hexz_host(&[&"image", &"build"]);
            if built.status != 0 {
                return Err(format!("hexz-host image build failed: {}", built.stderr));
            }
            // One template per test process, in the target directory (not leaked into
            // /tmp); the previous process's is replaced.
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-template");
            if out.exists() {
                std::fs::remove_dir_all(&out).map_err(|e| e.to_string())?;
            }
            let t = hexz_host(&[&"template", &"build", &"-o", &out]);
            if t.status != 0 {
                // QEMU is there and the image built: a failure here is a bug, not a skip.
                panic!("template build failed: {}", t.stderr);
            }
            Ok(out)
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// The template, or `None` after saying why the test cannot run (a failure under CI).
fn template_or_skip(test: &str) -> Option<&'static Path> {
    match template() {
        Ok(t) => Some(t),
        Err(why) if std::env::var_os("CI").is_some() => panic!("{test}: cannot boot a VM: {why}"),
        Err(why) => {
            eprintln!("{test}: skipped, cannot boot a VM here: {why}");
            None
        }
    }
}

fn restored(out: &Output) -> bool {
    let err = text(&out.stderr);
    err.contains("restoring memory template") && !err.contains("booting")
}

#[test]
fn a_restored_run_gives_the_same_exit_code_streams_and_stdin_as_a_cold_run() {
    let Some(t) =
        template_or_skip("a_restored_run_gives_the_same_exit_code_streams_and_stdin_as_a_cold_run")
    else {
        return;
    };
    let ws = Workspace::verbose();
    let script = b"cat README.md; md5sum src/main.rs; echo to-err >&2; exit 3\n";
    let warm = ws.run_os(&[&"--template", &t], &["sh"], script);
    let cold = ws.run_os(&[&"--cold"], &["sh"], script);
    assert!(restored(&warm), "stderr: {}", text(&warm.stderr));
    assert!(!restored(&cold), "stderr: {}", text(&cold.stderr));
    assert_eq!(
        warm.status.code(),
        Some(3),
        "stderr: {}",
        text(&warm.stderr)
    );
    assert_eq!(
        cold.status.code(),
        Some(3),
        "stderr: {}",
        text(&cold.stderr)
    );
    assert_eq!(text(&warm.stdout), text(&cold.stdout));
    assert!(text(&warm.stdout).starts_with("# sample\n"));
    assert!(text(&warm.stderr).contains("to-err\n"));
    assert!(!text(&warm.stdout).contains("to-err"));
    let missing = ws.run_os(&[&"--template", &t], &["nosuch-command"], b"");
    assert_eq!(missing.status.code(), Some(127));
    ws.assert_clean();
}

#[test]
fn clones_of_one_template_read_different_random_bytes_and_the_host_clock() {
    let Some(t) =
        template_or_skip("clones_of_one_template_read_different_random_bytes_and_the_host_clock")
    else {
        return;
    };
    let ws = Workspace::verbose();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    // The saved guest's clock stopped when the template was saved: make sure that is
    // far enough in the past for a clone that kept it to be caught.
    let saved = std::fs::metadata(t.join("state"))
        .and_then(|m| m.modified())
        .expect("template state");
    let age = saved.elapsed().unwrap_or_default();
    if age.as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_secs(5) - age);
    }
    let console = ws.dir.path().join("console.log");
    let read = || {
        let before = now();
        let out = ws.run_os(
            &[&"--template", &t, &"--console-log", &console],
            &[
                "sh",
                "-c",
                "date +%s; head -c 32 /dev/urandom | od -An -tx1",
            ],
            b"",
        );
        let after = now();
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        assert!(restored(&out), "stderr: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let (clock, random) = stdout.split_once('\n').expect("two parts");
        let clock: u64 = clock.trim().parse().expect("date +%s");
        assert!(
            before.saturating_sub(1) <= clock && clock <= after + 1,
            "guest clock {clock} is not the host's ({before}..{after})"
        );
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(
            log.contains("random generator reseeded with 64 host bytes, clock set"),
            "the guest did not say it reseeded: {log}"
        );
        random.split_whitespace().collect::<String>()
    };
    let (a, b) = (read(), read());
    assert_eq!(a.len(), 64, "{a}");
    assert_ne!(a, b, "two clones read the same random bytes");
    ws.assert_clean();
}

#[test]
fn restored_runs_keep_separate_overlays_and_commit_keeps_what_they_wrote() {
    let Some(t) =
        template_or_skip("restored_runs_keep_separate_overlays_and_commit_keeps_what_they_wrote")
    else {
        return;
    };
    let ws = Workspace::verbose();
    let script = |me: &str| format!("echo {me} > {me}.txt; sleep 2; ls *.txt; cat {me}.txt");
    let overlay = ws.dir.path().join("overlay");
    let spawn = |s: &str, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--template", &t];
        args.extend_from_slice(extra);
        ws.run_cmd_os(&args, &["sh", "-c", s])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (script("alpha"), script("beta"));
    let ca = spawn(&a, &[&"--overlay", &overlay]);
    let cb = spawn(&b, &[]);
    let (oa, ob) = (
        ca.wait_with_output().expect("wait"),
        cb.wait_with_output().expect("wait"),
    );
    assert!(oa.status.success(), "alpha: {}", text(&oa.stderr));
    assert!(ob.status.success(), "beta: {}", text(&ob.stderr));
    assert_eq!(text(&oa.stdout), "alpha.txt\nalpha\n");
    assert_eq!(text(&ob.stdout), "beta.txt\nbeta\n");
    let committed = ws.dir.path().join("after.hxz");
    let c = hexz_host(&[
        &"commit",
        &ws.snapshot,
        &"--overlay",
        &overlay,
        &"-o",
        &committed,
    ]);
    assert_eq!(c.status, 0, "commit: {}", c.stderr);
    assert_eq!(
        hexz_host(&[&"cat", &committed, &"alpha.txt"]).stdout_text(),
        "alpha\n"
    );
    ws.assert_clean();
}

#[test]
fn timeout_and_sigint_stop_a_restored_vm_and_leave_nothing_behind() {
    let Some(t) =
        template_or_skip("timeout_and_sigint_stop_a_restored_vm_and_leave_nothing_behind")
    else {
        return;
    };
    let ws = Workspace::verbose();
    let out = ws.run_os(
        &[&"--template", &t, &"--timeout", &"3s"],
        &["sleep", "600"],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    ws.assert_clean();

    let mut child = ws
        .run_cmd_os(
            &[&"--template", &t],
            &[
                "sh",
                "-c",
                "trap 'echo got-int; exit 5' INT; echo ready; sleep 600 & wait",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("read");
    assert_eq!(first, "ready\n");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).expect("read rest");
    let status = child.wait().expect("wait");
    assert_eq!(rest, "got-int\n");
    assert_eq!(status.code(), Some(5));
    ws.assert_clean();
}

/// A copy of the template whose `memory` is a symlink to the original's (unless
/// `copy_memory`), so it can be damaged without touching the original.
fn copy_template(t: &Path, to: &Path, copy_memory: bool) {
    std::fs::create_dir(to).expect("mkdir");
    for f in ["state", "template.json"] {
        std::fs::copy(t.join(f), to.join(f)).expect("copy");
    }
    if copy_memory {
        let ok = Command::new("cp")
            .arg("--sparse=always")
            .arg(t.join("memory"))
            .arg(to.join("memory"))
            .status()
            .expect("cp");
        assert!(ok.success());
    } else {
        std::os::unix::fs::symlink(t.join("memory"), to.join("memory")).expect("symlink");
    }
}

fn flip_byte(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x55;
    f.write_all_at(&b, at).expect("write");
}

#[test]
fn a_corrupt_or_stale_template_is_refused_with_a_clear_message() {
    let Some(t) = template_or_skip("a_corrupt_or_stale_template_is_refused_with_a_clear_message")
    else {
        return;
    };
    let ws = Workspace::verbose();
    let refused = |dir: &Path, says: &str| {
        let out = ws.run_os(&[&"--template", &dir], &["true"], b"");
        assert_refused(&out, says);
        let err = text(&out.stderr);
        assert!(err.contains("hexz-host template build"), "{err}");
        assert!(!err.contains("restoring"), "{err}");
    };

    let state = ws.dir.path().join("bad-state");
    copy_template(t, &state, false);
    flip_byte(&state.join("state"), 100);
    refused(&state, "corrupt template");

    let memory = ws.dir.path().join("bad-memory");
    copy_template(t, &memory, true);
    // SAFETY: lseek on a file we own; SEEK_DATA finds the first byte the guest wrote.
    let first_data = {
        let f = std::fs::File::open(memory.join("memory")).expect("open");
        let off = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_DATA) };
        assert!(off >= 0);
        off as u64
    };
    flip_byte(&memory.join("memory"), first_data + 7);
    refused(&memory, "the memory image does not match");

    let stale = ws.dir.path().join("stale");
    copy_template(t, &stale, false);
    let meta_path = stale.join("template.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("read")).expect("json");
    meta["qemu_stamp"] = "/usr/bin/qemu-system-x86_64:1:2.3:4".into();
    meta["qemu_version"] = "QEMU emulator version 6.0.0".into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write");
    refused(
        &stale,
        "stale: it was built with another QEMU (QEMU emulator version 6.0.0",
    );

    let partial = ws.dir.path().join("partial");
    copy_template(t, &partial, false);
    std::fs::remove_file(partial.join("memory")).expect("rm memory");
    refused(&partial, "is incomplete (memory: No such file or directory");

    let not_one = ws.dir.path().join("empty");
    std::fs::create_dir(&not_one).expect("mkdir");
    refused(&not_one, "not a hexz memory template");
    ws.assert_clean();
}

#[test]
fn a_template_qemu_cannot_load_falls_back_to_a_cold_boot_and_says_so() {
    let Some(t) =
        template_or_skip("a_template_qemu_cannot_load_falls_back_to_a_cold_boot_and_says_so")
    else {
        return;
    };
    let ws = Workspace::verbose();
    // A state that passes the checksum (it is recorded anew) but is not a machine.
    let bad = ws.dir.path().join("unloadable");
    copy_template(t, &bad, false);
    let garbage = b"QEVM\0\0\0\x03this is not a migration stream".to_vec();
    std::fs::write(bad.join("state"), &garbage).expect("write");
    let meta_path = bad.join("template.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("read")).expect("json");
    meta["state_blake3"] = blake3::hash(&garbage).to_hex().to_string().into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write");

    let out = ws.run_os(&[&"--template", &bad], &["cat", "README.md"], b"");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert_eq!(text(&out.stdout), "# sample\n");
    let fallback: Vec<&str> = err.lines().filter(|l| l.contains("booting cold")).collect();
    assert_eq!(fallback.len(), 1, "one line says it booted cold: {err}");
    assert!(fallback[0].contains("restoring template"), "{err}");
    ws.assert_clean();
}

/// The cache directory `hexz-host` uses when `HEXZ_CACHE_DIR` is not set for it.
fn default_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("HEXZ_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("hexz");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/hexz")
}

#[test]
fn run_restores_the_cached_template_by_default_and_boots_with_cold() {
    let Some(t) =
        template_or_skip("run_restores_the_cached_template_by_default_and_boots_with_cold")
    else {
        return;
    };
    let ws = Workspace::verbose();
    // A private cache sharing the kernel and images, so no other test sees its template.
    let cache = ws.dir.path().join("cache");
    std::fs::create_dir(&cache).expect("mkdir");
    let real = default_cache();
    for d in ["kernels", "images"] {
        std::os::unix::fs::symlink(real.join(d), cache.join(d)).expect("symlink");
    }
    let host = |args: &[&str]| {
        let out = Command::new(bin("hexz-host"))
            .args(args)
            .arg(&ws.snapshot)
            .args(["--", "cat", "README.md"])
            .env("HEXZ_CACHE_DIR", &cache)
            .env("TMPDIR", &ws.tmp)
            .env_remove("RUST_LOG")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "# sample\n");
        out
    };
    let before = host(&["run"]);
    assert!(
        !restored(&before),
        "no template yet: {}",
        text(&before.stderr)
    );
    let build = |says: &str| {
        let out = Command::new(bin("hexz-host"))
            .args(["template", "build"])
            .env("HEXZ_CACHE_DIR", &cache)
            .output()
            .expect("template build");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
        PathBuf::from(text(&out.stdout).trim())
    };
    // A template of an older image: `template build` removes it.
    let old = cache.join("templates").join("old");
    std::fs::create_dir_all(&old).expect("mkdir");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("template.json")).expect("read"))
            .expect("json");
    meta["image"] = "an-older-image".into();
    std::fs::write(
        old.join("template.json"),
        serde_json::to_vec(&meta).expect("json"),
    )
    .expect("write");
    let dir = build("template built");
    assert!(!old.exists(), "the stale template is still there");
    assert!(
        dir.starts_with(cache.join("templates")),
        "{}",
        dir.display()
    );
    assert_eq!(build("up to date"), dir);
    let warm = host(&["run"]);
    assert!(restored(&warm), "{}", text(&warm.stderr));
    let cold = host(&["run", "--cold"]);
    assert!(!restored(&cold), "{}", text(&cold.stderr));
    // Another memory size has no template: a cold boot, with a one-line hint.
    let other = host(&["run", "--memory", "384M"]);
    assert!(!restored(&other), "{}", text(&other.stderr));
    let hint: Vec<String> = text(&other.stderr)
        .lines()
        .filter(|l| l.contains("no memory template"))
        .map(String::from)
        .collect();
    assert_eq!(hint.len(), 1, "{}", text(&other.stderr));
    assert!(hint[0].contains("hexz-host template build"), "{hint:?}");
    ws.assert_clean();
}
