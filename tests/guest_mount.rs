//! The real guest daemon on a real FUSE mount (on this host, over a Unix socket — never
//! AF_VSOCK here), served by a real `hexz-host serve`, driven with ordinary programs and
//! system calls. Every mount a test makes is unmounted, also when the test fails.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hexz_e2e::proto::Server;
use hexz_e2e::{bin, hexz_host, pseudo_random};
use std::sync::{Arc, Barrier, Mutex};

fn is_mounted(path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some(want.to_str().unwrap_or("")) && l.contains("fuse")
        })
}

/// `hexz-host serve` + `hexz-guestfused` mounting its snapshot at `mnt`.
struct Mount {
    server: Option<Server>,
    guest: Child,
    mnt: PathBuf,
    snap: PathBuf,
    socket: PathBuf,
    overlay: PathBuf,
    /// Where the server's stderr goes (None: the test's stderr).
    server_log: Option<PathBuf>,
}

/// A test that cannot run here says why and returns false; where the `CI` environment
/// variable is set (CI has root and /dev/fuse) it fails instead, so a broken CI machine
/// cannot turn the suite green by skipping it.
fn skip(reason: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("cannot run: {reason}; CI is set, where this must not be skipped");
    }
    // Straight to stderr, past the test harness's capture, so a skip is always visible.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIP {}: {reason}",
        std::thread::current().name().unwrap_or("?")
    );
    false
}

/// True where FUSE can be mounted; otherwise see [`skip`].
fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        return skip("/dev/fuse is missing, so no FUSE mount can be made here");
    }
    if !nix_is_root() {
        return skip("mounting FUSE without fusermount needs root");
    }
    true
}

/// `hexz-host serve` on `socket` over `overlay`, its stderr to `log` if given.
fn start_server(snap: &Path, socket: &Path, overlay: &Path, log: Option<&Path>) -> Server {
    let Some(log) = log else {
        return Server::start(snap, socket, &["--overlay", overlay.to_str().unwrap()]);
    };
    let _ = fs::remove_file(socket);
    let err = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(bin("hexz-host"))
        .arg("serve")
        .arg(snap)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--overlay")
        .arg(overlay)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn hexz-host serve");
    let mut server = Server {
        child,
        socket: socket.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "server exited before listening ({status}): {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "server did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Evicts clean pages, dentries and unused inodes (the kernel then FORGETs them), so
/// what follows goes to the daemon and the host.
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Mount {
    fn new(dir: &Path, snap: &Path, extra_guest: &[&str]) -> Mount {
        Mount::with_log(dir, snap, extra_guest, None)
    }

    fn with_log(dir: &Path, snap: &Path, extra_guest: &[&str], log: Option<&Path>) -> Mount {
        let mnt = dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let socket = dir.join("hexz.sock");
        let overlay = dir.join("overlay");
        let server = start_server(snap, &socket, &overlay, log);
        let guest = spawn_guest(&mnt, &socket, extra_guest);
        let m = Mount {
            server: Some(server),
            guest,
            mnt,
            snap: snap.to_path_buf(),
            socket,
            overlay,
            server_log: log.map(Path::to_path_buf),
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.mnt) {
            assert!(
                Instant::now() < deadline,
                "{} was not mounted within 30 s",
                self.mnt.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn restart_server_after_kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill9();
        }
        std::thread::sleep(Duration::from_millis(300));
        self.server = Some(start_server(
            &self.snap,
            &self.socket,
            &self.overlay,
            self.server_log.as_deref(),
        ));
    }

    /// SIGTERM to the daemon: it unmounts and exits.
    fn unmount(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.guest.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.guest.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mounted(&self.mnt) {
            let c = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
            // SAFETY: detaching a mount this test made.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = self.guest.kill();
        let _ = self.guest.wait();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn spawn_guest(mnt: &Path, socket: &Path, extra: &[&str]) -> Child {
    Command::new(bin("hexz-guestfused"))
        .arg(mnt)
        .arg("--connect")
        .arg(format!("unix:{}", socket.display()))
        .args(if extra.contains(&"--timeout") {
            &[][..]
        } else {
            &["--timeout", "20"][..]
        })
        .args(extra)
        .env("RUST_LOG", "warn,fuser::mnt=error")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn hexz-guestfused")
}

fn fixture(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("README.md"), b"# from the snapshot\n").unwrap();
    fs::write(src.join("big.bin"), pseudo_random(2_000_000, 5)).unwrap();
    fs::write(src.join("sub/a.txt"), b"a\n").unwrap();
    std::os::unix::fs::symlink("sub/a.txt", src.join("link")).unwrap();
    let snap = dir.join("ws.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    snap
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn posix_behaviour_through_the_guest_mount() {
    if !fuse_available() {
        return;
    }
    posix_suite(&[]);
}

#[test]
fn posix_behaviour_through_the_guest_mount_opening_each_file_on_the_host() {
    if !fuse_available() {
        return;
    }
    posix_suite(&["--open-per-file"]);
}

fn posix_suite(guest_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, guest_args);

    // Snapshot contents, symlinks, hard links, fifos.
    assert_eq!(
        fs::read(m.path("README.md")).unwrap(),
        b"# from the snapshot\n"
    );
    assert_eq!(
        fs::read(m.path("big.bin")).unwrap(),
        pseudo_random(2_000_000, 5)
    );
    assert_eq!(
        fs::read_link(m.path("link")).unwrap(),
        PathBuf::from("sub/a.txt")
    );
    assert_eq!(fs::read(m.path("link")).unwrap(), b"a\n");
    fs::hard_link(m.path("sub/a.txt"), m.path("hard")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.path("hard")).unwrap().ino(),
        fs::metadata(m.path("sub/a.txt")).unwrap().ino()
    );
    let fifo = std::ffi::CString::new(m.path("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(m.path("fifo")).unwrap().file_type()
    ));

    // Metadata: mode bits, owner, nanosecond times.
    fs::set_permissions(m.path("README.md"), fs::Permissions::from_mode(0o4750)).unwrap();
    assert_eq!(
        fs::metadata(m.path("README.md")).unwrap().mode() & 0o7777,
        0o4750
    );
    std::os::unix::fs::chown(m.path("README.md"), Some(1234), Some(4321)).unwrap();
    let md = fs::metadata(m.path("README.md")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    let f = File::options()
        .write(true)
        .open(m.path("sub/a.txt"))
        .unwrap();
    let t = std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    drop(f);
    let md = fs::metadata(m.path("sub/a.txt")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_456_789));

    // O_EXCL, O_TRUNC, O_APPEND.
    fs::write(m.path("x"), b"12345").unwrap();
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.path("x"))
        ),
        libc::EEXIST
    );
    let mut a = OpenOptions::new().append(true).open(m.path("x")).unwrap();
    a.write_all(b"678").unwrap();
    drop(a);
    assert_eq!(fs::read(m.path("x")).unwrap(), b"12345678");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("x"))
        .unwrap();
    assert_eq!(fs::metadata(m.path("x")).unwrap().len(), 0);

    // truncate both ways on a snapshot file
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .unwrap();
    f.set_len(10).unwrap();
    f.set_len(20).unwrap();
    drop(f);
    let mut want = pseudo_random(10, 5);
    want.resize(20, 0);
    assert_eq!(fs::read(m.path("big.bin")).unwrap(), want);

    // rename: over an existing file, a directory, RENAME_NOREPLACE / EXCHANGE via renameat2.
    fs::write(m.path("r1"), b"one").unwrap();
    fs::write(m.path("r2"), b"two").unwrap();
    fs::rename(m.path("r1"), m.path("r2")).unwrap();
    assert_eq!(fs::read(m.path("r2")).unwrap(), b"one");
    assert!(!m.path("r1").exists());
    fs::create_dir(m.path("dd")).unwrap();
    fs::write(m.path("dd/in"), b"in").unwrap();
    fs::rename(m.path("dd"), m.path("dd2")).unwrap();
    assert_eq!(fs::read(m.path("dd2/in")).unwrap(), b"in");
    fs::write(m.path("r3"), b"three").unwrap();
    let c = |p: &str| std::ffi::CString::new(m.path(p).to_str().unwrap()).unwrap();
    let (r2, r3) = (c("r2"), c("r3"));
    // SAFETY: renameat2 with valid C strings.
    let noreplace = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            r3.as_ptr(),
            libc::AT_FDCWD,
            r2.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(
        (noreplace, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EEXIST))
    );
    // SAFETY: as above.
    let exch = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            r3.as_ptr(),
            libc::AT_FDCWD,
            r2.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(exch, 0);
    assert_eq!(
        (
            fs::read(m.path("r2")).unwrap(),
            fs::read(m.path("r3")).unwrap()
        ),
        (b"three".to_vec(), b"one".to_vec())
    );
    assert_eq!(errno_of(fs::remove_dir(m.path("dd2"))), libc::ENOTEMPTY);

    // unlink while open
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("ghost"))
        .unwrap();
    f.write_all(b"still readable").unwrap();
    fs::remove_file(m.path("ghost")).unwrap();
    assert!(!m.path("ghost").exists());
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still readable");
    drop(f);

    // ...also for a read-only descriptor whose first read from the host comes after the
    // unlink (page cache dropped, so the read cannot be served from memory).
    fs::write(m.path("ghost-ro"), b"read-only ghost").unwrap();
    File::open(m.path("ghost-ro")).unwrap().sync_all().unwrap();
    let mut ro = File::open(m.path("ghost-ro")).unwrap();
    fs::remove_file(m.path("ghost-ro")).unwrap();
    drop_caches();
    let mut s = String::new();
    ro.read_to_string(&mut s).unwrap();
    assert_eq!(s, "read-only ghost");
    drop(ro);

    // mmap: read a snapshot file, write through a shared mapping
    fs::write(m.path("mm"), vec![0u8; 8192]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("mm"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: mapping 8192 bytes of a file we hold open; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(b"mapped!".as_ptr(), (p as *mut u8).add(4000), 7);
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    drop(f);
    assert_eq!(&fs::read(m.path("mm")).unwrap()[4000..4007], b"mapped!");

    // large sparse file beyond 4 GiB
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("huge"))
        .unwrap();
    f.write_all_at(b"end", (5 << 30) - 3).unwrap();
    f.write_all_at(b"start", 0).unwrap();
    f.sync_all().unwrap();
    let mut buf = [0u8; 3];
    f.read_exact_at(&mut buf, (5 << 30) - 3).unwrap();
    assert_eq!(&buf, b"end");
    assert_eq!(f.metadata().unwrap().len(), 5 << 30);
    f.read_exact_at(&mut buf, 3 << 30).unwrap();
    assert_eq!(buf, [0, 0, 0]);
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(hole > 0 && hole < (5 << 30), "SEEK_HOLE gave {hole}");
    drop(f);

    // xattrs
    xattr::set(m.path("x"), "user.color", b"blue").unwrap();
    assert_eq!(
        xattr::get(m.path("x"), "user.color").unwrap(),
        Some(b"blue".to_vec())
    );
    assert!(xattr::list(m.path("x")).unwrap().any(|n| n == "user.color"));
    xattr::remove(m.path("x"), "user.color").unwrap();
    assert_eq!(xattr::get(m.path("x"), "user.color").unwrap(), None);

    // fsync of a file and of a directory
    let f = File::create(m.path("synced")).unwrap();
    (&f).write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    File::open(&m.mnt).unwrap().sync_all().unwrap();

    // Locks are the guest kernel's own (docs/PROTOCOL.md §7): they exclude each other here.
    let l1 = File::open(m.path("synced")).unwrap();
    let l2 = File::open(m.path("synced")).unwrap();
    // SAFETY: flock on open descriptors.
    unsafe {
        assert_eq!(
            libc::flock(l1.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
        assert_eq!(
            libc::flock(l2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1,
            "second flock granted"
        );
        assert_eq!(libc::flock(l1.as_raw_fd(), libc::LOCK_UN), 0);
        assert_eq!(
            libc::flock(l2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
    }

    // rm -rf of a tree
    for i in 0..200 {
        let d = m.path(&format!("tree/d{}", i % 10));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), b"x").unwrap();
    }
    fs::remove_dir_all(m.path("tree")).unwrap();
    assert!(!m.path("tree").exists());

    // Names the host refuses come back as the right errno.
    assert_eq!(
        errno_of(fs::write(m.path(&"n".repeat(256)), b"")),
        libc::ENAMETOOLONG
    );
}

#[test]
fn git_init_add_commit_status_checkout_in_the_mount() {
    if !fuse_available() {
        return;
    }
    if Command::new("git").arg("--version").output().is_err() && !skip("git is not installed") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.email=t@hexz",
                "-c",
                "user.name=t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&m.mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "first"]);
    assert_eq!(git(&["status", "--porcelain"]), "", "clean after commit");
    fs::write(m.path("README.md"), b"changed\n").unwrap();
    assert_eq!(git(&["status", "--porcelain"]).trim(), "M README.md");
    git(&["checkout", "-q", "--", "README.md"]);
    assert_eq!(
        fs::read(m.path("README.md")).unwrap(),
        b"# from the snapshot\n"
    );
    git(&["checkout", "-qb", "topic"]);
    fs::write(m.path("new.txt"), b"topic\n").unwrap();
    git(&["add", "new.txt"]);
    git(&["commit", "-qm", "second"]);
    git(&["checkout", "-q", "main"]);
    assert!(!m.path("new.txt").exists());
    git(&["checkout", "-q", "topic"]);
    assert_eq!(fs::read(m.path("new.txt")).unwrap(), b"topic\n");
    assert_eq!(git(&["log", "--oneline"]).lines().count(), 2);
    git(&["fsck", "--no-progress"]);
}

#[test]
fn random_reads_and_writes_match_a_local_copy_across_a_remount() {
    if !fuse_available() {
        return;
    }
    random_io_matches_a_local_copy(&[]);
}

#[test]
fn random_reads_and_writes_match_a_local_copy_with_the_writeback_cache() {
    if !fuse_available() {
        return;
    }
    random_io_matches_a_local_copy(&["--writeback"]);
}

fn random_io_matches_a_local_copy(guest_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let local = tmp.path().join("local.bin");
    fs::copy(tmp.path().join("src/big.bin"), &local).unwrap();
    let mut m = Mount::new(tmp.path(), &snap, guest_args);
    let lf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&local)
        .unwrap();
    let mf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("big.bin"))
        .unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..400 {
        let off = next(3_000_000);
        let len = 1 + next(300_000) as usize;
        if i % 3 == 0 {
            let data = pseudo_random(len, i);
            lf.write_all_at(&data, off).unwrap();
            mf.write_all_at(&data, off).unwrap();
        } else {
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            let na = lf.read_at(&mut a, off).unwrap();
            let nb = mf.read_at(&mut b, off).unwrap();
            assert_eq!(na, nb, "read length at {off}");
            assert!(a[..na] == b[..nb], "bytes differ at {off}+{len} (op {i})");
        }
    }
    mf.sync_all().unwrap();
    drop(mf);
    let want = fs::read(&local).unwrap();
    assert!(
        fs::read(m.path("big.bin")).unwrap() == want,
        "whole file differs"
    );
    // Remount (new daemon, same server and overlay): still identical.
    m.unmount();
    m.guest = spawn_guest(&m.mnt, &m.socket, guest_args);
    m.wait_mounted();
    assert!(
        fs::read(m.path("big.bin")).unwrap() == want,
        "differs after remount"
    );
}

#[test]
fn the_mount_carries_on_when_the_server_is_killed_and_restarted() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let mut m = Mount::new(
        tmp.path(),
        &snap,
        &["--negative-ttl", "0", "--timeout", "5"],
    );
    fs::write(m.path("before.txt"), b"written before the crash").unwrap();
    File::open(m.path("before.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    let open_file = File::open(m.path("big.bin")).unwrap();
    let ino_before = fs::metadata(m.path("before.txt")).unwrap().ino();

    m.restart_server_after_kill9();

    // The open descriptor keeps working (its server handle is reopened), names resolve to
    // the same inodes, and new writes land.
    let mut buf = vec![0u8; 1000];
    open_file.read_exact_at(&mut buf, 500_000).unwrap();
    assert_eq!(buf, pseudo_random(2_000_000, 5)[500_000..501_000]);
    assert_eq!(
        fs::read(m.path("before.txt")).unwrap(),
        b"written before the crash"
    );
    assert_eq!(
        fs::metadata(m.path("before.txt")).unwrap().ino(),
        ino_before
    );
    fs::write(m.path("after.txt"), b"written after").unwrap();
    assert_eq!(fs::read(m.path("after.txt")).unwrap(), b"written after");
    drop(open_file);

    // While the server is down, calls fail after the bounded wait instead of hanging.
    if let Some(mut s) = m.server.take() {
        s.kill9();
    }
    let t = Instant::now();
    let r = fs::metadata(m.path("never-created"));
    let r = r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        r,
        Some(libc::ETIMEDOUT),
        "a call during an outage must fail with ETIMEDOUT"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "a call hung for {:?}",
        t.elapsed()
    );
}

/// Files in the overlay's `data/` directory: one per node with data of its own.
fn upper_files(overlay: &Path) -> usize {
    fs::read_dir(overlay.join("data"))
        .map(|d| d.filter(|e| e.is_ok()).count())
        .unwrap_or(0)
}

/// Waits up to `secs` for `f` to hold; returns whether it did.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn concurrent_first_reads_of_the_same_files_with_few_host_handles() {
    if !fuse_available() {
        return;
    }
    // Sixteen threads read each file at the same moment, each its own page (no
    // readahead), with no host handle open for the file yet (caches dropped before each
    // round), while a cap of 4 handles forces eviction all the time: no read may fail (a
    // handle released under a read gives EBADF) and every byte must be right.
    const FILES: usize = 150;
    const ROUNDS: usize = 6;
    const THREADS: usize = 16;
    const PAGE: usize = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &["--max-node-handles", "4"]);
    // Written through the mount, so they are overlay files: the host reads them on its
    // worker threads, where a release can overtake a read.
    let want: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(THREADS * PAGE, 100 + i as u64))
        .collect();
    for (i, w) in want.iter().enumerate() {
        fs::write(m.path(&format!("f{i}")), w).unwrap();
    }
    let want = Arc::new(want);
    let errors = Arc::new(Mutex::new(Vec::new()));
    for round in 0..ROUNDS {
        drop_caches();
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (want, errors, barrier) = (want.clone(), errors.clone(), barrier.clone());
                let mnt = m.mnt.clone();
                std::thread::spawn(move || {
                    for (i, w) in want.iter().enumerate() {
                        let f = File::open(mnt.join(format!("f{i}"))).unwrap();
                        use std::os::fd::AsRawFd;
                        // SAFETY: advice on a descriptor we hold open.
                        unsafe {
                            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM)
                        };
                        barrier.wait();
                        let off = t * PAGE;
                        let mut buf = vec![0u8; PAGE];
                        let r = f.read_exact_at(&mut buf, off as u64);
                        let mut errors = errors.lock().unwrap();
                        match r {
                            Err(e) => errors.push(format!("round {round} f{i}@{off}: {e}")),
                            Ok(()) if buf[..] != w[off..off + PAGE] => {
                                errors.push(format!("round {round} f{i}@{off}: wrong bytes"))
                            }
                            Ok(()) => {}
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} failed reads, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

#[test]
fn a_file_unlinked_while_open_keeps_its_bytes_across_a_server_restart() {
    if !fuse_available() {
        return;
    }
    // The host drops a connection's node references when it closes. A restarted server
    // keeps nameless nodes for a grace period (at least 30 s) so that clients can take
    // their references again (`retain`); after it, only retained ones are left. So the
    // read comes after the grace, and nothing touches the file before it: only the
    // daemon's `retain` can keep it. Both modes at once, to wait only once.
    const AFTER_GRACE: Duration = Duration::from_secs(40);
    let want = pseudo_random(300_000, 77);
    let mut cases = Vec::new();
    for guest_args in [&[][..], &["--open-per-file"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fixture(tmp.path());
        let m = Mount::new(tmp.path(), &snap, guest_args);
        fs::write(m.path("doomed"), &want).unwrap();
        File::open(m.path("doomed")).unwrap().sync_all().unwrap();
        let f = File::open(m.path("doomed")).unwrap();
        fs::remove_file(m.path("doomed")).unwrap();
        cases.push((guest_args, tmp, m, f));
    }
    for (_, _, m, _) in &mut cases {
        m.restart_server_after_kill9();
        // A name never looked up goes to the host, so the daemon is connected again.
        assert!(!m.path("never-there").exists());
    }
    std::thread::sleep(AFTER_GRACE);
    drop_caches(); // the reads below must come from the host
    for (guest_args, _, _, f) in &cases {
        let mut got = vec![0u8; want.len()];
        let r = f.read_exact_at(&mut got, 0);
        assert!(
            r.is_ok(),
            "{guest_args:?}: reading the unlinked file after the restart: {r:?}"
        );
        assert!(got == want, "{guest_args:?}: wrong bytes after the restart");
    }
}

#[test]
fn rm_rf_of_ten_thousand_files_leaves_no_upper_files() {
    if !fuse_available() {
        return;
    }
    // rm -rf lists the directory with READDIRPLUS; every entry the host returns carries a
    // node reference, also those the kernel's buffer has no room for. Unless the daemon
    // gives those back, the host keeps the unlinked files (and their data) forever.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    fs::create_dir(m.path("many")).unwrap();
    // Long names: fewer entries fit the kernel's buffer than the daemon may ask for.
    let long = "n".repeat(200);
    for i in 0..10_000 {
        fs::write(m.path(&format!("many/{long}-{i:05}")), b"x").unwrap();
    }
    assert!(upper_files(&m.overlay) >= 10_000, "files were not created");
    drop_caches();
    let st = Command::new("rm")
        .arg("-rf")
        .arg(m.path("many"))
        .status()
        .unwrap();
    assert!(st.success(), "rm -rf: {st}");
    assert!(!m.path("many").exists());
    let left = || upper_files(&m.overlay);
    assert!(
        eventually(30, || left() == 0),
        "{} upper files left in the overlay after rm -rf",
        left()
    );
}

/// Sends SIGUSR1 to the server and returns N from the `live_nodes=N` line it logs.
fn live_nodes(server: &Server, log: &Path) -> u64 {
    let seen = |text: &str| text.matches("live_nodes=").count();
    let before = seen(&fs::read_to_string(log).unwrap_or_default());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGUSR1) };
    let mut text = String::new();
    let logged = eventually(10, || {
        text = fs::read_to_string(log).unwrap_or_default();
        seen(&text) > before
    });
    assert!(
        logged,
        "the server logged no new `live_nodes=N` line on SIGUSR1"
    );
    let tail = text.rsplit("live_nodes=").next().unwrap_or("");
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("unreadable live_nodes in {tail:?}"))
}

#[test]
fn the_server_holds_no_more_nodes_after_rm_rf_than_before() {
    if !fuse_available() {
        return;
    }
    // The same leak seen from the server: after creating and removing 2000 files, it
    // holds no more live nodes than before. Needs the server's SIGUSR1 `live_nodes=N` log.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let log = tmp.path().join("server.log");
    let m = Mount::with_log(tmp.path(), &snap, &[], Some(&log));
    let server = m.server.as_ref().unwrap();
    let before = live_nodes(server, &log);
    fs::create_dir(m.path("many")).unwrap();
    let long = "n".repeat(200);
    for i in 0..2_000 {
        fs::write(m.path(&format!("many/{long}-{i:05}")), b"x").unwrap();
    }
    drop_caches();
    let st = Command::new("rm")
        .arg("-rf")
        .arg(m.path("many"))
        .status()
        .unwrap();
    assert!(st.success(), "rm -rf: {st}");
    drop_caches();
    let mut after = u64::MAX;
    let settled = eventually(30, || {
        after = live_nodes(server, &log);
        after <= before
    });
    assert!(
        settled,
        "live nodes: {before} before, {after} after creating and removing 2000 files"
    );
}
