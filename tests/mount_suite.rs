//! What every hexz FUSE mount must do, whoever serves it (the guest daemon over a
//! socket, `hexz-host mount` in process): the same functions run on both mounts, given
//! the mount point of a writable mount of [`fixture`]'s snapshot.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{hexz_host, pseudo_random};

/// True if `path` is a FUSE mount point.
pub fn is_mounted(path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some(want.to_str().unwrap_or("")) && l.contains("fuse")
        })
}

/// A test that cannot run here says why and returns false; where the `CI` environment
/// variable is set (CI has root and /dev/fuse) it fails instead, so a broken CI machine
/// cannot turn the suite green by skipping it.
pub fn skip(reason: &str) -> bool {
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
pub fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        return skip("/dev/fuse is missing, so no FUSE mount can be made here");
    }
    if !nix_is_root() {
        return skip("mounting FUSE without fusermount needs root");
    }
    true
}

/// True where git is installed; otherwise see [`skip`].
pub fn git_available() -> bool {
    Command::new("git").arg("--version").output().is_ok() || skip("git is not installed")
}

/// Evicts clean pages, dentries and unused inodes (the kernel then FORGETs them), so
/// what follows goes to the daemon and the host.
pub fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
}

pub fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `dir/src` (a small tree: README.md, big.bin, sub/a.txt, link) packed as `dir/ws.hxz`.
pub fn fixture(dir: &Path) -> PathBuf {
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

pub fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

/// Paths under a mount point.
struct At<'a>(&'a Path);

impl At<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

/// POSIX behaviour on a writable mount of [`fixture`] at `mnt`: contents, links, fifos,
/// metadata, open flags, truncation, renames, unlinked-open files, mmap, sparse files
/// past 4 GiB, SEEK_HOLE, xattrs, fsync, flock, rm -rf, long names.
pub fn posix_behaviour(mnt: &Path) {
    let m = At(mnt);

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
    File::open(mnt).unwrap().sync_all().unwrap();

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

/// git init/add/commit/status/checkout/fsck in a writable mount of [`fixture`] at `mnt`.
/// Listings of one large directory (several pages) by concurrent readers, while another
/// thread keeps adding and removing other names in it: every listing holds each name that
/// existed throughout exactly once. (In no-opendir mode listings find their host handle
/// by the cookie they reached; this is where two of them could get mixed up.)
pub fn concurrent_listings(mnt: &Path) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = mnt.join("many");
    fs::create_dir(&dir).unwrap();
    let base: Vec<String> = (0..3000)
        .map(|i| format!("file-{i:05}-with-a-longer-name"))
        .collect();
    for n in &base {
        File::create(dir.join(n)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = dir.join(format!("extra-{}", i % 50));
                if i.is_multiple_of(2) {
                    let _ = File::create(&p);
                } else {
                    let _ = fs::remove_file(&p);
                }
                i += 1;
            }
        })
    };
    let listers: Vec<_> = (0..3)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                for _ in 0..8 {
                    let mut seen: HashMap<String, u32> = HashMap::new();
                    for e in fs::read_dir(&dir).unwrap() {
                        let name = e.unwrap().file_name().to_string_lossy().into_owned();
                        *seen.entry(name).or_default() += 1;
                    }
                    all.push(seen);
                }
                all
            })
        })
        .collect();
    let listings: Vec<_> = listers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    for (i, seen) in listings.iter().enumerate() {
        let twice: Vec<_> = seen.iter().filter(|(_, &c)| c > 1).collect();
        assert!(twice.is_empty(), "listing {i} has names twice: {twice:?}");
        let missing: Vec<_> = base.iter().filter(|n| !seen.contains_key(*n)).collect();
        assert!(
            missing.is_empty(),
            "listing {i} misses {} names that existed throughout, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
    }
    // Quiet again: a listing is the base names and whatever extras remain.
    let now: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("extra-"))
        .collect();
    assert_eq!(now.len(), base.len());
    fs::remove_dir_all(&dir).unwrap();
}

pub fn git_round_trip(mnt: &Path) {
    let m = At(mnt);
    let git = |args: &[&str]| git_in(mnt, args);
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

/// Runs git in `dir` with a fixed identity; panics with git's stderr if it fails.
pub fn git_in(dir: &Path, args: &[&str]) -> String {
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
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dir/repo`: a committed git repository of 60 files whose times lie before its index
/// was written (as in any checkout that is not being edited), packed as `dir/repo.hxz`
/// with the default (source) inode numbers. Returns the snapshot and the index's bytes.
pub fn packed_repository(dir: &Path) -> (PathBuf, Vec<u8>) {
    let src = dir.join("repo");
    for i in 0..60 {
        let d = src.join(format!("d{}", i % 6));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}.txt")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    // Old times: git's racy-entry check then trusts the stat data it recorded.
    let out = Command::new("find")
        .arg(&src)
        .args([
            "-exec",
            "touch",
            "-h",
            "-d",
            "2024-01-02 03:04:05",
            "{}",
            "+",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    git_in(&src, &["init", "-q"]);
    git_in(&src, &["add", "-A"]);
    git_in(&src, &["commit", "-qm", "packed"]);
    // git writes its index at the end of `commit`; one `status` settles it (a clean
    // repository's status then leaves it alone).
    git_in(&src, &["status", "--porcelain"]);
    let index = fs::read(src.join(".git/index")).unwrap();
    let snap = dir.join("repo.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    (snap, index)
}

/// In a fresh writable mount of [`packed_repository`] at `mnt`, the first `git status`
/// finds the tree clean from the stat data in the index alone: it neither rewrites the
/// index nor reads the files (the inode numbers and times are the packed ones).
pub fn first_git_status_keeps_the_index(mnt: &Path, index: &[u8]) {
    let f = mnt.join("d3/f3.txt");
    let st = fs::symlink_metadata(&f).unwrap();
    assert_eq!(
        fs::read(mnt.join(".git/index")).unwrap(),
        index,
        "the mount shows the packed index"
    );
    assert_eq!(git_in(mnt, &["status", "--porcelain"]), "", "clean tree");
    assert!(
        fs::read(mnt.join(".git/index")).unwrap() == index,
        "the first git status rewrote .git/index: the mount reports other stat data \
         (inode {}, ctime {}) than git recorded",
        st.ino(),
        st.ctime(),
    );
    // And git still notices a real change.
    fs::write(&f, b"changed\n").unwrap();
    assert_eq!(
        git_in(mnt, &["status", "--porcelain"]).trim(),
        "M d3/f3.txt"
    );
}
