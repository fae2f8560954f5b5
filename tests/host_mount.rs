//! `hexz-host mount` on a real FUSE mount: the same FUSE adapter as the guest daemon,
//! over the in-process transport. The suite shared with the guest mount
//! (`mount_suite`) runs here too. Every mount a test makes is unmounted, also when the
//! test fails (`HostMount`'s drop).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hexz_e2e::mount_suite::{self, errno_of, fixture, fuse_available, is_mounted};
use hexz_e2e::{bin, hexz_host, pseudo_random, sample_tree};

/// A foreground `hexz-host mount`; unmounted (SIGTERM, then a detach if need be) and
/// waited for when dropped.
struct HostMount {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl HostMount {
    fn new(snap: &Path, mnt: &Path, args: &[&str]) -> HostMount {
        fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("log");
        let err = File::create(&log).unwrap();
        let child = Command::new(bin("hexz-host"))
            .arg("mount")
            .arg(snap)
            .arg(mnt)
            .args(args)
            .env("RUST_LOG", "info,fuser::mnt=error")
            .env("TMPDIR", mnt.parent().unwrap())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn hexz-host mount");
        let mut m = HostMount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(mnt) {
            if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "hexz-host mount exited ({status}) before mounting: {}",
                    fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "not mounted within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// SIGTERM: the mount unmounts, flushes its overlay and exits; returns its status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        detach_if_mounted(&self.mnt);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        self.stop();
    }
}

fn detach_if_mounted(mnt: &Path) {
    if is_mounted(mnt) {
        let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
        // SAFETY: detaching a mount this test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Runs a `hexz-host mount` that is expected to fail at once; if it mounts after all,
/// it is unmounted and the test fails.
fn mount_fails(snap: &Path, mnt: &Path, args: &[&str]) -> String {
    let mut child = Command::new(bin("hexz-host"))
        .arg("mount")
        .arg(snap)
        .arg(mnt)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hexz-host mount");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            assert!(!status.success(), "mount succeeded: {err}");
            return err;
        }
        if Instant::now() > deadline {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(500));
            detach_if_mounted(mnt);
            let _ = child.kill();
            let _ = child.wait();
            panic!("hexz-host mount did not fail at once");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The error line of a failed command: one line, starting `hexz-host: error:`.
fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].starts_with("hexz-host: error: "),
        "not an error line: {stderr}"
    );
    lines[0]
}

/// A tree with files of many sizes, a symlink, a hard link and modes, packed.
fn rich_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("tree");
    sample_tree(&src);
    for i in 0..300u64 {
        let d = src.join(format!("many/d{}", i % 7));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}")),
            pseudo_random((i * 997 % 70_000) as usize, i),
        )
        .unwrap();
    }
    fs::write(src.join("exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("exec.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    let snap = dir.join("tree.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    (src, snap)
}

/// Every entry under `a` has its twin under `b`: type, mode, size, bytes, link target.
fn assert_same_tree(a: &Path, b: &Path) -> usize {
    let mut n = 0;
    let mut names: Vec<_> = fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut theirs: Vec<_> = fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    theirs.sort();
    assert_eq!(names, theirs, "listing of {}", b.display());
    for name in names {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.mode(), mb.mode(), "mode of {}", pb.display());
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", pb.display());
        n += 1;
        if ma.is_dir() {
            n += assert_same_tree(&pa, &pb);
        } else if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        } else {
            assert_eq!(ma.len(), mb.len(), "size of {}", pb.display());
            assert!(
                fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                "bytes of {}",
                pb.display()
            );
        }
    }
    n
}

#[test]
fn a_read_only_mount_matches_the_source_tree_byte_for_byte() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, snap) = rich_fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &[]);
    let n = assert_same_tree(&src, &m.mnt);
    assert!(n > 300, "compared only {n} entries");
    // Hard links are one inode in the mount too.
    assert_eq!(
        fs::metadata(m.path("README.md")).unwrap().ino(),
        fs::metadata(m.path("src/README-again.md")).unwrap().ino()
    );
    assert_eq!(fs::metadata(m.path("README.md")).unwrap().nlink(), 2);
}

#[test]
fn writes_to_a_read_only_mount_fail_with_erofs_and_create_nothing() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &[]);
    let erofs = libc::EROFS;
    assert_eq!(errno_of(fs::write(m.path("new"), b"x")), erofs);
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(m.path("README.md"))),
        erofs
    );
    assert_eq!(errno_of(fs::create_dir(m.path("d"))), erofs);
    assert_eq!(errno_of(fs::remove_file(m.path("README.md"))), erofs);
    assert_eq!(
        errno_of(fs::rename(m.path("README.md"), m.path("R"))),
        erofs
    );
    assert_eq!(
        errno_of(fs::set_permissions(
            m.path("README.md"),
            fs::Permissions::from_mode(0o600)
        )),
        erofs
    );
    assert_eq!(
        errno_of(xattr::set(m.path("README.md"), "user.x", b"1")),
        erofs
    );
    assert_eq!(
        fs::read(m.path("README.md")).unwrap(),
        b"# from the snapshot\n"
    );
    assert!(!m.path("new").exists());
    // Nothing was created beside the snapshot: no overlay, no temporary directory
    // (TMPDIR of the mount is this directory); only the mount point and its log.
    let after: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut after = after;
    after.sort();
    assert_eq!(
        after,
        ["mnt", "mnt.log", "src", "ws.hxz"],
        "files appeared beside the snapshot"
    );
}

#[test]
fn rw_changes_land_in_the_overlay_and_a_remount_shows_them() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let overlay = tmp.path().join("overlay");
    let ov = overlay.to_str().unwrap();
    let mnt = tmp.path().join("mnt");
    let mut m = HostMount::new(&snap, &mnt, &["--rw", "--overlay", ov]);
    fs::write(m.path("new.txt"), b"made in the mount").unwrap();
    fs::write(m.path("README.md"), b"changed\n").unwrap();
    fs::remove_file(m.path("sub/a.txt")).unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    let big = m.path("big.bin");
    OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .write_all_at(b"PATCH", 1_000_000)
        .unwrap();
    let status = m.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!is_mounted(&mnt));
    assert!(overlay.join("journal").exists());

    // Read-only remount of the same overlay: every change is there.
    let m = HostMount::new(&snap, &mnt, &["--overlay", ov]);
    assert_eq!(fs::read(m.path("new.txt")).unwrap(), b"made in the mount");
    assert_eq!(fs::read(m.path("README.md")).unwrap(), b"changed\n");
    assert!(!m.path("sub/a.txt").exists());
    assert!(m.path("dir").is_dir());
    let mut want = pseudo_random(2_000_000, 5);
    want[1_000_000..1_000_005].copy_from_slice(b"PATCH");
    assert!(fs::read(m.path("big.bin")).unwrap() == want);
}

#[test]
fn an_ephemeral_rw_overlay_is_gone_after_unmount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let mnt = tmp.path().join("mnt");
    let overlays = || {
        fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("hexz-overlay-"))
            })
            .count()
    };
    let mut m = HostMount::new(&snap, &mnt, &["--rw"]);
    fs::write(m.path("scratch"), b"gone soon").unwrap();
    assert_eq!(overlays(), 1, "the ephemeral overlay is in TMPDIR");
    assert!(m.stop().is_some_and(|s| s.success()));
    assert_eq!(overlays(), 0, "the ephemeral overlay was left behind");
    let m = HostMount::new(&snap, &mnt, &[]);
    assert!(!m.path("scratch").exists());
}

#[test]
fn daemon_mode_returns_once_mounted_and_stops_on_umount_and_on_sigterm() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let pid_file = tmp.path().join("m.pid");
    let log = tmp.path().join("m.log");
    for stop_with_umount in [true, false] {
        let r = hexz_host(&[
            &"mount",
            &snap,
            &mnt,
            &"--daemon",
            &"--rw",
            &"--pid-file",
            &pid_file,
            &"--log",
            &log,
        ]);
        // Whatever happens below, the mount goes.
        struct Detach<'a>(&'a Path);
        impl Drop for Detach<'_> {
            fn drop(&mut self) {
                detach_if_mounted(self.0);
            }
        }
        let _guard = Detach(&mnt);
        assert_eq!(r.status, 0, "{}", r.stderr);
        assert!(r.stdout_text().contains("pid "), "{}", r.stdout_text());
        assert!(is_mounted(&mnt), "not mounted when --daemon returned");
        let pid: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: probing a pid with signal 0.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "daemon {pid} not running");
        fs::write(mnt.join("f"), b"through the daemon").unwrap();
        if stop_with_umount {
            assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
        } else {
            // SAFETY: signalling the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        // SAFETY: as above.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "daemon {pid} still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_mounted(&mnt));
        assert!(!pid_file.exists(), "pid file left behind");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("overlay flushed"), "log: {text}");
    }
}

#[test]
fn uid_and_gid_options_set_the_owner_shown() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let stored = fs::metadata(tmp.path().join("src/README.md")).unwrap();
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--uid", "4242"]);
    let md = fs::metadata(m.path("README.md")).unwrap();
    assert_eq!((md.uid(), md.gid()), (4242, stored.gid()));
    drop(m);
    let m = HostMount::new(
        &snap,
        &tmp.path().join("mnt"),
        &["--uid", "1001", "--gid", "2002"],
    );
    for p in ["", "README.md", "sub", "sub/a.txt", "link"] {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (1001, 2002), "{p}");
    }
    let mut names: Vec<_> = fs::read_dir(m.path("sub"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().uid())
        .collect();
    names.dedup();
    assert_eq!(names, [1001]);
}

#[test]
fn nodev_and_nosuid_by_default_and_lifted_by_flags() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let mnt = tmp.path().join("mnt");
    let opts = |mnt: &Path| -> Vec<String> {
        let want = fs::canonicalize(mnt).unwrap();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(4) == want.to_str())
            .map(|l| {
                l.split(' ')
                    .nth(5)
                    .unwrap_or("")
                    .split(',')
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let m = HostMount::new(&snap, &mnt, &[]);
    let o = opts(&mnt);
    for want in ["ro", "nodev", "nosuid"] {
        assert!(o.iter().any(|x| x == want), "{want} missing in {o:?}");
    }
    drop(m);
    let m = HostMount::new(&snap, &mnt, &["--dev", "--suid", "--rw"]);
    let o = opts(&mnt);
    for unwanted in ["ro", "nodev", "nosuid"] {
        assert!(!o.iter().any(|x| x == unwanted), "{unwanted} in {o:?}");
    }
    drop(m);
}

#[test]
fn concurrent_readers_see_the_right_bytes() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, snap) = rich_fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &[]);
    mount_suite::drop_caches();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (src, mnt) = (src.clone(), m.mnt.clone());
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let rel = format!("many/d{}/f{i}", i % 7);
                    let want = fs::read(src.join(&rel)).unwrap();
                    let f = File::open(mnt.join(&rel)).unwrap();
                    // Each thread its own slice, then the whole file.
                    let off = (want.len() as u64 * t / 8) as usize;
                    let mut part = vec![0u8; (want.len() - off).min(4096)];
                    f.read_exact_at(&mut part, off as u64).unwrap();
                    assert!(part[..] == want[off..off + part.len()], "{rel}@{off}");
                    assert!(fs::read(mnt.join(&rel)).unwrap() == want, "{rel}");
                }
                let big = fs::read(mnt.join("blob.bin")).unwrap();
                assert!(big == fs::read(src.join("blob.bin")).unwrap());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn posix_behaviour_through_the_host_mount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--rw"]);
    mount_suite::posix_behaviour(&m.mnt);
}

#[test]
fn concurrent_listings_of_a_changing_directory_see_each_name_once() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--rw"]);
    mount_suite::concurrent_listings(&m.mnt);
}

#[test]
fn git_init_add_commit_status_checkout_in_the_host_mount() {
    if !fuse_available() || !mount_suite::git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--rw"]);
    mount_suite::git_round_trip(&m.mnt);
}

#[test]
fn the_first_git_status_in_a_fresh_host_mount_keeps_the_packed_index() {
    if !fuse_available() || !mount_suite::git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (snap, index) = mount_suite::packed_repository(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--rw"]);
    mount_suite::first_git_status_keeps_the_index(&m.mnt, &index);
}

#[test]
fn mount_errors_are_one_clear_line() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let mnt = tmp.path().join("mnt");

    let e = mount_fails(&snap, &tmp.path().join("nowhere"), &["--rw"]);
    assert!(one_error_line(&e).contains("does not exist"), "{e}");
    let e = mount_fails(&snap, &tmp.path().join("src/README.md"), &["--rw"]);
    assert!(one_error_line(&e).contains("not a directory"), "{e}");

    fs::create_dir(&mnt).unwrap();
    let garbage = tmp.path().join("garbage.hxz");
    fs::write(&garbage, pseudo_random(10_000, 1)).unwrap();
    let e = mount_fails(&garbage, &mnt, &["--rw"]);
    assert!(one_error_line(&e).contains("not a hexz snapshot"), "{e}");
    let cut = tmp.path().join("cut.hxz");
    let bytes = fs::read(&snap).unwrap();
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = mount_fails(&cut, &mnt, &["--rw"]);
    let line = one_error_line(&e);
    assert!(line.contains("cut.hxz"), "{e}");
    let e = mount_fails(&tmp.path().join("missing.hxz"), &mnt, &["--rw"]);
    assert!(one_error_line(&e).contains("missing.hxz"), "{e}");

    // An overlay made for another snapshot.
    let other_src = tmp.path().join("other");
    fs::create_dir(&other_src).unwrap();
    fs::write(other_src.join("o"), b"other").unwrap();
    let other = tmp.path().join("other.hxz");
    assert_eq!(hexz_host(&[&"pack", &other_src, &"-o", &other]).status, 0);
    let overlay = tmp.path().join("overlay");
    let ov = overlay.to_str().unwrap();
    {
        let _m = HostMount::new(&other, &mnt, &["--rw", "--overlay", ov]);
    }
    let e = mount_fails(&snap, &mnt, &["--rw", "--overlay", ov]);
    assert!(one_error_line(&e).contains("belongs to snapshot"), "{e}");

    // A second writable opener of one overlay, and a second mount on one mount point.
    let ov2 = tmp.path().join("overlay2");
    let ov2 = ov2.to_str().unwrap();
    let _m = HostMount::new(&snap, &mnt, &["--rw", "--overlay", ov2]);
    let mnt2 = tmp.path().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let e = mount_fails(&snap, &mnt2, &["--rw", "--overlay", ov2]);
    assert!(one_error_line(&e).contains("in use"), "{e}");
    let e = mount_fails(&snap, &mnt, &["--rw"]);
    assert!(one_error_line(&e).contains("already a mount point"), "{e}");

    // --nbd without the kernel module: says what is missing and what to use instead.
    if !Path::new("/sys/module/nbd").exists() {
        let e = mount_fails(&snap, &mnt2, &["--nbd"]);
        let line = one_error_line(&e);
        assert!(line.contains("nbd kernel module"), "{e}");
        assert!(line.contains("without --nbd"), "{e}");
    }
}

#[test]
fn a_one_mebibyte_frame_cache_still_serves_every_byte() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, snap) = rich_fixture(tmp.path());
    let m = HostMount::new(&snap, &tmp.path().join("mnt"), &["--cache-size", "1M"]);
    mount_suite::drop_caches();
    assert_same_tree(&src, &m.mnt);
    drop(m);
    let r = hexz_host(&[
        &"mount",
        &snap,
        &tmp.path().join("mnt"),
        &"--cache-size",
        &"12X",
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("unknown unit"), "{}", r.stderr);
}

#[test]
fn a_stream_only_snapshot_shows_its_streams_as_files_writable_through_a_block_overlay() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk_src = tmp.path().join("disk.img");
    let mem_src = tmp.path().join("mem.img");
    let disk = pseudo_random(3 << 20, 7);
    fs::write(&disk_src, &disk).unwrap();
    fs::write(&mem_src, pseudo_random(1 << 20, 8)).unwrap();
    let snap = tmp.path().join("streams.hxz");
    let r = hexz_host(&[
        &"pack",
        &"-o",
        &snap,
        &"--disk",
        &disk_src,
        &"--memory",
        &mem_src,
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let cat = |snap: &Path, stream: &str| {
        Command::new(bin("hexz-host"))
            .args(["cat", "--stream"])
            .arg(snap)
            .arg(stream)
            .output()
            .unwrap()
            .stdout
    };
    let mnt = tmp.path().join("mnt");
    {
        // Read-only: the files are the streams, byte for byte; writing is EROFS.
        let m = HostMount::new(&snap, &mnt, &[]);
        let mut names: Vec<_> = fs::read_dir(&m.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["disk", "memory"]);
        assert!(fs::read(m.mnt.join("disk")).unwrap() == disk);
        assert!(fs::read(m.mnt.join("memory")).unwrap() == fs::read(&mem_src).unwrap());
        assert!(
            cat(&snap, "disk") == disk,
            "the file equals `hexz-host cat SNAP disk`"
        );
        assert_eq!(
            errno_of(OpenOptions::new().write(true).open(m.mnt.join("disk"))),
            libc::EROFS
        );
    }
    let overlay = tmp.path().join("ov");
    let ov = overlay.to_str().unwrap();
    {
        // --rw: a write in the middle of a block, fsynced, lands in the block overlay.
        let m = HostMount::new(&snap, &mnt, &["--rw", "--overlay", ov]);
        let f = OpenOptions::new()
            .write(true)
            .open(m.mnt.join("disk"))
            .unwrap();
        f.write_all_at(b"written through the mount", 1_000_001)
            .unwrap();
        f.sync_all().unwrap();
        // A stream cannot grow.
        assert_eq!(errno_of(f.write_all_at(b"x", 3 << 20)), libc::ENOSPC);
    }
    assert!(
        overlay.join("disk.cow").exists(),
        "the block overlay is in --overlay"
    );
    let m = HostMount::new(&snap, &mnt, &["--overlay", ov]);
    let mut want = disk.clone();
    want[1_000_001..1_000_001 + 25].copy_from_slice(b"written through the mount");
    let got = fs::read(m.mnt.join("disk")).unwrap();
    assert_eq!(got.len(), disk.len());
    assert!(
        got == want,
        "the write survived the remount, nothing else changed"
    );
    drop(m);
    let r = hexz_host(&[&"verify", &snap]);
    assert_eq!(
        r.status, 0,
        "the snapshot itself is unchanged: {}",
        r.stderr
    );
    // `commit` folds the block overlay into the new snapshot's stream; the rest of the
    // stream (and the untouched memory stream) is referred to in the base, not stored.
    for (name, extra) in [("next.hxz", None), ("alone.hxz", Some("--standalone"))] {
        let next = tmp.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"commit", &snap, &"--overlay", &overlay, &"-o", &next];
        if let Some(e) = &extra {
            args.push(e);
        }
        let r = hexz_host(&args);
        assert_eq!(r.status, 0, "commit: {}", r.stderr);
        assert!(
            cat(&next, "disk") == want,
            "{name}: the committed disk stream"
        );
        assert!(
            cat(&next, "memory") == fs::read(&mem_src).unwrap(),
            "{name}: memory"
        );
        let len = fs::metadata(&next).unwrap().len();
        if extra.is_none() {
            assert!(
                len < 400_000,
                "{name}: {len} bytes: the unchanged disk was stored again"
            );
        } else {
            assert!(
                len > 4_000_000,
                "{name}: {len} bytes: standalone holds everything"
            );
        }
    }
}
