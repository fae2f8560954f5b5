//! `hexz-host run` in a real QEMU microVM (TCG + vhost-device-vsock on hosts without
//! /dev/vhost-vsock). Needs qemu-system-x86_64, vhost-device-vsock, busybox-static, the
//! static guest binaries (`cargo build --release -p hexz-guestfused --target
//! x86_64-unknown-linux-musl`) and apt (the kernel is fetched once by `image build`).
//! Without them each test says why and passes — unless `CI` is set, where it fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hexz_e2e::vm_support::{assert_refused, text, Workspace};
use hexz_e2e::{bin, hexz_host};

/// Why VM tests cannot run here, or `None` when they can (image built once per process).
fn missing_prerequisite() -> Option<String> {
    static CHECK: OnceLock<Option<String>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let on_path = |name: &str| {
                std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
                    .unwrap_or(false)
            };
            if !on_path("qemu-system-x86_64") {
                return Some("qemu-system-x86_64 is not installed".into());
            }
            let cargo_bin = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cargo/bin/vhost-device-vsock"))
                .is_some_and(|p| p.is_file());
            if !on_path("vhost-device-vsock") && !cargo_bin {
                return Some(
                    "vhost-device-vsock is not installed (cargo install vhost-device-vsock --version 0.3.0 --locked)"
                        .into(),
                );
            }
            let built = hexz_host(&[&"image", &"build"]);
            if built.status != 0 {
                return Some(format!("hexz-host image build failed: {}", built.stderr));
            }
            None
        })
        .clone()
}

/// True when the test may go on; otherwise says why (and fails under CI).
fn vm_available(test: &str) -> bool {
    match missing_prerequisite() {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("{test}: cannot boot a VM: {why}"),
        Some(why) => {
            eprintln!("{test}: skipped, cannot boot a VM here: {why}");
            false
        }
    }
}

#[test]
fn exit_code_propagates_and_stdout_and_stderr_stay_apart() {
    if !vm_available("exit_code_propagates_and_stdout_and_stderr_stay_apart") {
        return;
    }
    let ws = Workspace::new();
    let out = ws.run(
        &[],
        &["sh", "-c", "cat README.md; echo to-err >&2; exit 3"],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "# sample\n");
    assert!(text(&out.stderr).contains("to-err\n"));
    assert!(!text(&out.stdout).contains("to-err"));
    ws.assert_clean();
}

#[test]
fn output_printed_before_a_sleep_reaches_the_host_before_the_command_ends() {
    if !vm_available("output_printed_before_a_sleep_reaches_the_host_before_the_command_ends") {
        return;
    }
    let ws = Workspace::new();
    let mut child = ws
        .run_cmd(&[], &["sh", "-c", "echo early; sleep 5; echo late"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("read");
    let early_at = Instant::now();
    assert_eq!(first, "early\n");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the run had already ended when its first line arrived"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).expect("read rest");
    let status = child.wait().expect("wait");
    assert_eq!(rest, "late\n");
    assert!(status.success());
    assert!(
        early_at.elapsed() >= Duration::from_secs(3),
        "the first line came only {:?} before the end",
        early_at.elapsed()
    );
}

#[test]
fn stdin_is_forwarded_to_the_command() {
    if !vm_available("stdin_is_forwarded_to_the_command") {
        return;
    }
    let ws = Workspace::new();
    // `sh < job.sh`: the script arrives on stdin; a second read after it sees EOF.
    let script = b"echo from-script; wc -c src/main.rs; exit 7\n";
    let out = ws.run(&[], &["sh"], script);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-script\n1500 src/main.rs\n");

    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = ws.run(&[], &["sh", "-c", "cat > /tmp/in; wc -c < /tmp/in"], &big);
    assert_eq!(text(&out.stdout).trim(), "300000");
    assert!(out.status.success());
}

#[test]
fn a_missing_command_exits_127_and_a_non_executable_one_126() {
    if !vm_available("a_missing_command_exits_127_and_a_non_executable_one_126") {
        return;
    }
    let ws = Workspace::new();
    let out = ws.run(&[], &["no-such-command"], b"");
    assert_eq!(
        out.status.code(),
        Some(127),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("no-such-command"));
    let out = ws.run(&[], &["./README.md"], b"");
    assert_eq!(
        out.status.code(),
        Some(126),
        "stderr: {}",
        text(&out.stderr)
    );
    ws.assert_clean();
}

#[test]
fn a_file_written_in_the_guest_lands_in_the_overlay_and_commit_keeps_it() {
    if !vm_available("a_file_written_in_the_guest_lands_in_the_overlay_and_commit_keeps_it") {
        return;
    }
    let ws = Workspace::new();
    let overlay = ws.dir.path().join("overlay");
    let out = ws.run(
        &["--overlay", &overlay.to_string_lossy()],
        &[
            "sh",
            "-c",
            "echo made-in-vm > new.txt && mkdir -p out && cp README.md out/copy.md",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
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
        hexz_host(&[&"cat", &committed, &"new.txt"]).stdout_text(),
        "made-in-vm\n"
    );
    assert_eq!(
        hexz_host(&[&"cat", &committed, &"out/copy.md"]).stdout_text(),
        "# sample\n"
    );
    assert_ne!(hexz_host(&[&"cat", &ws.snapshot, &"new.txt"]).status, 0);
    ws.assert_clean();
}

#[test]
fn two_concurrent_runs_on_one_snapshot_keep_separate_overlays() {
    if !vm_available("two_concurrent_runs_on_one_snapshot_keep_separate_overlays") {
        return;
    }
    let ws = Workspace::new();
    // Each writes its own file, waits long enough for the other to have written, then
    // lists what it sees.
    let script = |me: &str| format!("echo {me} > {me}.txt; sleep 3; ls *.txt; cat {me}.txt");
    let (a, b) = (script("alpha"), script("beta"));
    let spawn = |s: &str| {
        ws.run_cmd(&[], &["sh", "-c", s])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (ca, cb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (
        ca.wait_with_output().expect("wait"),
        cb.wait_with_output().expect("wait"),
    );
    assert!(oa.status.success(), "alpha: {}", text(&oa.stderr));
    assert!(ob.status.success(), "beta: {}", text(&ob.stderr));
    assert_eq!(text(&oa.stdout), "alpha.txt\nalpha\n");
    assert_eq!(text(&ob.stdout), "beta.txt\nbeta\n");
    ws.assert_clean();
}

#[test]
fn timeout_stops_the_vm_exits_124_and_leaves_nothing_behind() {
    if !vm_available("timeout_stops_the_vm_exits_124_and_leaves_nothing_behind") {
        return;
    }
    let ws = Workspace::new();
    let start = Instant::now();
    let out = ws.run(&["--timeout", "8s"], &["sleep", "600"], b"");
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("timed out"));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    ws.assert_clean();
}

#[test]
fn sigterm_reaches_the_command_and_the_run_cleans_up() {
    if !vm_available("sigterm_reaches_the_command_and_the_run_cleans_up") {
        return;
    }
    let ws = Workspace::new();
    let mut child = ws
        .run_cmd(
            &[],
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 9' TERM; echo ready; sleep 600 & wait",
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
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).expect("read rest");
    let status = child.wait().expect("wait");
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(9));
    ws.assert_clean();
}

#[test]
fn a_guest_kernel_crash_ends_the_run_with_125_and_cleans_up() {
    if !vm_available("a_guest_kernel_crash_ends_the_run_with_125_and_cleans_up") {
        return;
    }
    let ws = Workspace::new();
    let out = ws.run(
        &[],
        &[
            "sh",
            "-c",
            "echo before; echo c > /proc/sysrq-trigger; sleep 600",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(125),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "before\n");
    assert!(
        text(&out.stderr).contains("QEMU exited"),
        "{}",
        text(&out.stderr)
    );
    ws.assert_clean();
}

#[test]
fn image_build_gives_byte_identical_initramfs_in_a_fresh_cache() {
    if !vm_available("image_build_gives_byte_identical_initramfs_in_a_fresh_cache") {
        return;
    }
    let built = hexz_host(&[&"image", &"build"]);
    assert_eq!(built.status, 0, "{}", built.stderr);
    let path_of = |out: &str, key: &str| -> PathBuf {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|| panic!("no '{key}' line in {out}"))
    };
    let first = path_of(&built.stdout_text(), "initrd ");
    // A second cache that shares only the unpacked kernel (no download), so the
    // initramfs is built again from scratch.
    let kernels = first
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("cache dir")
        .join("kernels");
    let fresh = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(&kernels, fresh.path().join("kernels")).expect("symlink");
    let out = Command::new(bin("hexz-host"))
        .args(["image", "build"])
        .env("HEXZ_CACHE_DIR", fresh.path())
        .output()
        .expect("image build");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = path_of(&text(&out.stdout), "initrd ");
    assert_ne!(first, second);
    assert!(second.starts_with(fresh.path()));
    assert!(
        std::fs::read(&first).expect("first") == std::fs::read(&second).expect("second"),
        "{} and {} differ",
        first.display(),
        second.display()
    );
    assert_eq!(
        first.parent().map(Path::file_name),
        second.parent().map(Path::file_name)
    );
}

#[test]
fn missing_kernel_fails_at_once_with_125_and_says_what_to_do() {
    // Needs no VM: the check happens before anything starts.
    let ws = Workspace::new();
    let out = ws.run(
        &[
            "--kernel",
            "/nonexistent/vmlinuz",
            "--initrd",
            "/nonexistent/initrd",
        ],
        &["true"],
        b"",
    );
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("/nonexistent/vmlinuz") || err.contains("not found"),
        "{err}"
    );
    assert!(Path::new(&ws.tmp).read_dir().expect("tmp").next().is_none());
}

/// MD5 of every regular file under `root`, as busybox's `md5sum` prints them, sorted.
fn md5_lines(root: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | sort | xargs md5sum")
        .current_dir(root)
        .output()
        .expect("md5sum on the host");
    assert!(out.status.success());
    text(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn guest_reads_match_the_packed_tree_and_posix_basics_work_in_the_vm() {
    if !vm_available("guest_reads_match_the_packed_tree_and_posix_basics_work_in_the_vm") {
        return;
    }
    let ws = Workspace::new();
    let want = md5_lines(&ws.dir.path().join("tree"));
    // Reads: every file byte for byte. Then a POSIX smoke run through the guest mount:
    // create, write, append, rename over, hard and symbolic links, chmod, truncate,
    // directories, unlink while open, rm -rf, each checked in the guest.
    let script = r#"
set -e
cd /workspace
find . -type f | sort | xargs md5sum > /tmp/sums
echo '--- sums'; cat /tmp/sums; echo '--- end'
mkdir -p t/a/b
echo one > t/f; echo two >> t/f; [ "$(cat t/f)" = "one
two" ]
echo new > t/g; mv t/g t/f; [ "$(cat t/f)" = new ]
ln t/f t/hard; [ "$(stat -c %h t/f)" = 2 ]
ln -s f t/soft; [ "$(readlink t/soft)" = f ]; [ "$(cat t/soft)" = new ]
chmod 640 t/f; [ "$(stat -c %a t/f)" = 640 ]
truncate -s 10000 t/f; [ "$(stat -c %s t/f)" = 10000 ]
truncate -s 2 t/f; [ "$(cat t/f)" = ne ]
exec 3< t/hard; rm t/hard t/f; [ "$(cat <&3)" = ne ]; exec 3<&-
mv t/a t/z; [ -d t/z/b ]
rmdir t/z/b; [ ! -e t/z/b ]
rm -rf t; [ ! -e t ]
sync
echo posix-ok
"#;
    let out = ws.run(&[], &["sh", "-c", script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let got: Vec<String> = stdout
        .lines()
        .skip_while(|l| *l != "--- sums")
        .skip(1)
        .take_while(|l| *l != "--- end")
        .map(str::to_string)
        .collect();
    assert_eq!(got, want, "guest reads differ from the packed tree");
    assert!(stdout.ends_with("posix-ok\n"), "{stdout}");
    ws.assert_clean();
}

#[test]
fn a_disk_stream_is_the_guests_vda_and_its_writes_land_in_the_block_overlay() {
    if !vm_available("a_disk_stream_is_the_guests_vda_and_its_writes_land_in_the_block_overlay") {
        return;
    }
    let ws = Workspace::new();
    let src = ws.dir.path().join("disk-src");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(src.join("hello.txt"), "from the disk\n").expect("write");
    let image = ws.dir.path().join("disk.img");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&image)
        .arg("16M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs; scripts/install-deps.sh installs it)");
    assert!(mkfs.status.success(), "mkfs.ext4: {}", text(&mkfs.stderr));
    let tree = ws.dir.path().join("tree");
    let snapshot = ws.dir.path().join("disk.hxz");
    let packed = hexz_host(&[&"pack", &tree, &"--disk", &image, &"-o", &snapshot]);
    assert_eq!(packed.status, 0, "pack: {}", packed.stderr);
    let overlay = ws.dir.path().join("ov");
    let disk_ws = Workspace {
        snapshot: snapshot.clone(),
        ..ws
    };
    let ws = &disk_ws;
    let run = |extra: &[&str], script: &str| {
        let out = ws.run(extra, &["sh", "-c", script], b"");
        assert!(
            out.status.success(),
            "{script}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    let ov = overlay.to_str().expect("utf-8 path");
    let out = run(
        &["--overlay", ov],
        "mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/hello.txt && \
         echo written > /mnt/new.txt && umount /mnt",
    );
    assert_eq!(out, "from the disk\n");
    assert!(overlay.join("disk.cow").is_file(), "no block overlay");
    let stream = hexz_host(&[&"cat", &"--stream", &snapshot, &"disk"]);
    assert_eq!(stream.status, 0, "cat --stream: {}", stream.stderr);
    assert!(
        stream.stdout == std::fs::read(&image).expect("read image"),
        "the snapshot's disk stream changed"
    );
    // The same overlay again: the write is there.
    let out = run(
        &["--overlay", ov],
        "mkdir -p /mnt && mount -o ro /dev/vda /mnt && cat /mnt/new.txt",
    );
    assert_eq!(out, "written\n");
    // `commit` folds the disk's block overlay into the new snapshot's disk stream: the
    // file the guest wrote is in the committed ext4 image (read with debugfs, no mount).
    let next = ws.dir.path().join("next.hxz");
    let c = hexz_host(&[&"commit", &snapshot, &"--overlay", &overlay, &"-o", &next]);
    assert_eq!(c.status, 0, "commit: {}", c.stderr);
    let img = ws.dir.path().join("next.img");
    let stream = hexz_host(&[&"cat", &"--stream", &next, &"disk"]);
    assert_eq!(stream.status, 0, "cat --stream: {}", stream.stderr);
    std::fs::write(&img, &stream.stdout).expect("write image");
    let debugfs = Command::new("debugfs")
        .args(["-R", "cat /new.txt"])
        .arg(&img)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(
        text(&debugfs.stdout),
        "written\n",
        "{}",
        text(&debugfs.stderr)
    );
    // An ephemeral overlay starts from the snapshot; --no-disk attaches nothing.
    let out = run(&[], "mkdir -p /mnt && mount -o ro /dev/vda /mnt && ls /mnt");
    assert_eq!(out, "hello.txt\nlost+found\n");
    let out = run(
        &["--no-disk"],
        "test -e /dev/vda && echo attached || echo none",
    );
    assert_eq!(out, "none\n");
    ws.assert_clean();
}

#[test]
fn git_round_trip_in_the_vm_with_git_added_to_the_image() {
    if !vm_available("git_round_trip_in_the_vm_with_git_added_to_the_image") {
        return;
    }
    let ws = Workspace::new();
    let overlay = ws.dir.path().join("ov");
    let script = "git init -q . 2>/dev/null && git add -A && \
        git -c user.name=vm -c user.email=vm@hexz commit -qm 'made in the vm' && \
        git status --porcelain && git log --format=%s && git ls-files";
    let out = ws.run(
        &[
            "--with",
            "git",
            "--overlay",
            overlay.to_str().expect("utf-8"),
        ],
        &["sh", "-c", script],
        b"",
    );
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "made in the vm\nREADME.md\nblob.bin\nmain-link\nsrc/README-again.md\nsrc/bin/tool.rs\nsrc/main.rs\n"
    );
    // The repository the guest made is whole on the host: commit, extract, ask git.
    let committed = ws.dir.path().join("git.hxz");
    let c = hexz_host(&[
        &"commit",
        &ws.snapshot,
        &"--overlay",
        &overlay,
        &"-o",
        &committed,
    ]);
    assert_eq!(c.status, 0, "commit: {}", c.stderr);
    let extracted = ws.dir.path().join("x");
    let x = hexz_host(&[&"extract", &committed, &extracted]);
    assert_eq!(x.status, 0, "extract: {}", x.stderr);
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .arg("-C")
            .arg(&extracted)
            .args(["-c", "safe.directory=*"])
            .args(args)
            .output()
            .expect("git on the host");
        assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    assert_eq!(git(&["log", "--format=%s"]), "made in the vm\n");
    assert_eq!(git(&["status", "--porcelain"]), "");
    git(&["fsck", "--strict"]);
    ws.assert_clean();
}

#[test]
fn a_missing_disk_stream_or_program_fails_at_once_with_125_and_says_which() {
    if !vm_available("a_missing_disk_stream_or_program_fails_at_once_with_125_and_says_which") {
        return;
    }
    let ws = Workspace::new();
    let out = ws.run(&["--disk", "disk"], &["true"], b"");
    assert_refused(&out, "no stream 'disk'");
    let out = ws.run(&["--with", "no-such-program-hexz"], &["true"], b"");
    assert_refused(&out, "--with no-such-program-hexz: no such program on PATH");
    ws.assert_clean();
}
