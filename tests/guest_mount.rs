//! The real guest daemon on a real FUSE mount (on this host, over a Unix socket — never
//! AF_VSOCK here), served by a real `hexz-host serve`, driven with ordinary programs and
//! system calls. Every mount a test makes is unmounted, also when the test fails.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hexz_e2e::mount_suite::{self, drop_caches, fixture, fuse_available, is_mounted};
use hexz_e2e::proto::Server;
use hexz_e2e::{bin, pseudo_random};
use std::sync::{Arc, Barrier, Mutex};

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
    /// More arguments for `serve`.
    server_extra: Vec<String>,
}

/// `hexz-host serve` on `socket` over `overlay`, its stderr to `log` if given.
fn start_server(
    snap: &Path,
    socket: &Path,
    overlay: &Path,
    log: Option<&Path>,
    extra: &[String],
) -> Server {
    let Some(log) = log else {
        let mut args = vec!["--overlay", overlay.to_str().unwrap()];
        args.extend(extra.iter().map(String::as_str));
        return Server::start(snap, socket, &args);
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
        .args(extra)
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

impl Mount {
    fn new(dir: &Path, snap: &Path, extra_guest: &[&str]) -> Mount {
        Mount::with_log(dir, snap, extra_guest, None)
    }

    fn with_log(dir: &Path, snap: &Path, extra_guest: &[&str], log: Option<&Path>) -> Mount {
        Mount::with_server(dir, snap, extra_guest, log, &[])
    }

    fn with_server(
        dir: &Path,
        snap: &Path,
        extra_guest: &[&str],
        log: Option<&Path>,
        server_extra: &[&str],
    ) -> Mount {
        let mnt = dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let socket = dir.join("hexz.sock");
        let overlay = dir.join("overlay");
        let server_extra: Vec<String> = server_extra.iter().map(|a| a.to_string()).collect();
        let server = start_server(snap, &socket, &overlay, log, &server_extra);
        let guest = spawn_guest(&mnt, &socket, extra_guest);
        let m = Mount {
            server: Some(server),
            guest,
            mnt,
            snap: snap.to_path_buf(),
            socket,
            overlay,
            server_log: log.map(Path::to_path_buf),
            server_extra,
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
            &self.server_extra,
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
    let mut cmd = Command::new(bin("hexz-guestfused"));
    cmd.env("RUST_LOG", "warn,fuser::mnt=error");
    // `--debug-log=PATH` (this harness's, not the daemon's): the adapter's debug log
    // goes to PATH, for tests that check what it did.
    for a in extra {
        if let Some(log) = a.strip_prefix("--debug-log=") {
            cmd.stderr(File::create(log).unwrap())
                .env("RUST_LOG", "warn,hexz_fuse=debug,fuser=error");
        }
    }
    cmd.arg(mnt)
        .arg("--connect")
        .arg(format!("unix:{}", socket.display()))
        .args(if extra.contains(&"--timeout") {
            &[][..]
        } else {
            &["--timeout", "20"][..]
        })
        .args(extra.iter().filter(|a| !a.starts_with("--debug-log=")))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn hexz-guestfused")
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

#[test]
fn posix_behaviour_through_the_guest_mount_opening_each_directory() {
    if !fuse_available() {
        return;
    }
    posix_suite(&["--opendir-per-dir"]);
}

#[test]
fn concurrent_listings_of_a_changing_directory_see_each_name_once_in_the_guest_mount() {
    if !fuse_available() {
        return;
    }
    for args in [&["--opendir-per-dir"][..], &[][..]] {
        eprintln!("guest daemon args: {args:?}");
        let tmp = tempfile::tempdir().unwrap();
        let snap = fixture(tmp.path());
        let m = Mount::new(tmp.path(), &snap, args);
        mount_suite::concurrent_listings(&m.mnt);
    }
}

fn posix_suite(guest_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, guest_args);
    mount_suite::posix_behaviour(&m.mnt);
}

#[test]
fn git_init_add_commit_status_checkout_in_the_mount() {
    if !fuse_available() || !mount_suite::git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    mount_suite::git_round_trip(&m.mnt);
}

#[test]
fn the_first_git_status_in_a_fresh_guest_mount_keeps_the_packed_index() {
    if !fuse_available() || !mount_suite::git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (snap, index) = mount_suite::packed_repository(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    mount_suite::first_git_status_keeps_the_index(&m.mnt, &index);
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
    // (A change: a lookup of a name the root lacks is answered without the host, since
    // the daemon knows the root's every name.)
    let r = fs::set_permissions(m.path("README.md"), fs::Permissions::from_mode(0o600));
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
    // Creates may be answered before the host made them (write-behind): an fsync of the
    // directory waits until they are.
    File::open(m.path("many")).unwrap().sync_all().unwrap();
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

/// Within 30 s of dropping the guest kernel's caches (again and again), the server
/// holds no more live nodes than `before`: what the daemon kept after `what` (pages,
/// listings) gave its references back.
fn nodes_settle_back(server: &Server, log: &Path, before: u64, what: &str) {
    let mut after = u64::MAX;
    let settled = eventually(30, || {
        drop_caches();
        after = live_nodes(server, log);
        after <= before
    });
    assert!(
        settled,
        "live nodes: {before} before, {after} after {what} and a cache drop"
    );
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

#[test]
fn a_file_capability_set_while_others_ask_for_it_is_never_reported_absent() {
    if !fuse_available() {
        return;
    }
    if !mount_suite::nix_is_root() {
        mount_suite::skip("setting file capabilities (CAP_SETFCAP) needs root");
        return;
    }
    // The adapter remembers that a file has no security.capability (the kernel asks
    // before every write). An "absent" answer racing a setxattr must not be remembered
    // after it: a later getxattr would say "absent", and a write would keep the
    // capability the kernel believes is not there.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    let f = m.path("cap-file");
    fs::write(&f, b"x").unwrap();
    let cap = net_bind_service_cap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = xattr::get(&f, "security.capability");
                }
            })
        })
        .collect();
    let mut bad = Vec::new();
    for i in 0..3000 {
        xattr::set(&f, "security.capability", &cap).unwrap();
        match xattr::get(&f, "security.capability") {
            Ok(Some(v)) if v == cap => {}
            other => bad.push(format!("round {i}: after setxattr: {other:?}")),
        }
        xattr::remove(&f, "security.capability").unwrap();
        if let Ok(Some(v)) = xattr::get(&f, "security.capability") {
            bad.push(format!("round {i}: after removexattr: {v:?}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(
        bad.is_empty(),
        "{} wrong answers, first: {:?}",
        bad.len(),
        bad.first()
    );
}

/// A v2 `security.capability` value: cap_net_bind_service, permitted.
fn net_bind_service_cap() -> Vec<u8> {
    [0x0200_0001u32, 1 << 10, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Appends to `file` as uid/gid 65534 (no capabilities: no CAP_FSETID).
fn append_as_nobody(file: &Path) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", "printf more >> \"$0\""])
        .arg(file)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(
        o.status.success(),
        "append to {} as nobody: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_write_drops_set_id_bits_and_file_capabilities_as_the_kernel_would() {
    if !fuse_available() {
        return;
    }
    if !mount_suite::nix_is_root() {
        mount_suite::skip("files of another owner and file capabilities need root");
        return;
    }
    // A write by a caller without CAP_FSETID drops the set-user-ID bit and a
    // group-executable file's set-group-ID bit; any write drops file capabilities. The
    // kernel does it (asking for security.capability before every write() call) unless
    // the daemon takes FUSE_HANDLE_KILLPRIV_V2, which would leave it to the daemon (and
    // chown's and truncate's share of it behind a setattr flag fuser 0.18 does not
    // pass on). This holds the mount to the kernel's rules whichever side does it.
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let snap = fixture(tmp.path());
    let m = Mount::new(tmp.path(), &snap, &[]);
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    // (path in the mount, mode, owner, whether nobody writes (else root), mode after);
    // files under d/ are made here, README.md comes from the snapshot.
    let cases = [
        ("d/suid-sgid-gx", 0o6755, 65534, true, 0o755),
        ("d/sgid-no-gx", 0o2745, 65534, true, 0o2745),
        ("d/suid-others-write", 0o4757, 0, true, 0o757),
        ("d/suid-root-writes", 0o4755, 0, false, 0o4755),
        ("README.md", 0o4757, 0, true, 0o757),
    ];
    for (rel, mode, owner, _, _) in cases {
        let f = m.path(rel);
        if rel.starts_with("d/") {
            fs::write(&f, b"x").unwrap();
        }
        std::os::unix::fs::chown(&f, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    }
    let capf = d.join("with-cap");
    fs::write(&capf, b"x").unwrap();
    xattr::set(&capf, "security.capability", &net_bind_service_cap()).unwrap();
    assert!(xattr::get(&capf, "security.capability").unwrap().is_some());

    let append_as_root = |f: &Path| {
        OpenOptions::new()
            .append(true)
            .open(f)
            .unwrap()
            .write_all(b"more")
            .unwrap()
    };
    for (rel, _, _, by_nobody, _) in cases {
        if by_nobody {
            append_as_nobody(&m.path(rel));
        } else {
            append_as_root(&m.path(rel));
        }
    }
    append_as_root(&capf);

    let modes = |root: &Path| -> Vec<(String, u32, bool)> {
        let mut v: Vec<_> = cases
            .iter()
            .map(|(rel, ..)| {
                let md = fs::metadata(root.join(rel)).unwrap();
                (rel.to_string(), md.mode() & 0o7777, md.len() > 1)
            })
            .collect();
        let has_cap = xattr::get(root.join("d/with-cap"), "security.capability").unwrap();
        v.push(("with-cap".into(), has_cap.is_some() as u32, true));
        v
    };
    let mut want: Vec<(String, u32, bool)> = cases
        .iter()
        .map(|(rel, _, _, _, after)| (rel.to_string(), *after, true))
        .collect();
    want.push(("with-cap".into(), 0, true));
    assert_eq!(modes(&m.mnt), want, "through the mount");
    drop_caches();
    assert_eq!(modes(&m.mnt), want, "through the mount, caches dropped");
    let seen = through_second_daemon(&m, &tmp.path().join("mnt2"), |p| modes(p));
    assert_eq!(seen, want, "on the host (a second mount)");
}

/// The per-opcode counts the server logged when the mount's connection closed.
fn closed_connection_ops(log: &Path) -> std::collections::HashMap<String, u64> {
    // The server logs a connection's close when it has read its end, which may be after
    // the daemon exited; and the harness's readiness probe is a connection of its own,
    // with no requests. So wait until every connection opened is closed, then take the
    // last one that made requests.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
        let (opened, closed) = (count("connection opened"), count("connection closed"));
        if (opened > 0 && closed >= opened) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = text
        .lines()
        .rfind(|l| l.contains("connection closed") && !l.contains("requests=0 "))
        .unwrap_or_else(|| panic!("no `connection closed` line in the server log:\n{text}"));
    let ops = line
        .split("ops=")
        .nth(1)
        .unwrap_or_else(|| panic!("no ops= in {line:?}"));
    let ops = ops.trim_start_matches('"');
    let ops = &ops[..ops.find('"').unwrap_or(ops.len())];
    ops.split_whitespace()
        .filter_map(|kv| kv.split_once(':'))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

#[test]
fn small_files_read_ahead_are_exact_and_never_older_than_a_write() {
    if !fuse_available() {
        return;
    }
    // Two directories of small files in the snapshot. In each, the first file read makes
    // the daemon read the others ahead (`read_files`); then files are written in place,
    // truncated and extended, or replaced with O_TRUNC — in `settled` after the copies
    // arrived, in `racing` while they are on their way — and every file must then read
    // as a local copy does, never as the copy read ahead.
    const FILES: usize = 120;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let local = tmp.path().join("local");
    for d in ["settled", "racing", "plain"] {
        fs::create_dir_all(src.join(d)).unwrap();
        for i in 0..FILES {
            let len = 1 + (i * 997) % 30_000;
            let data = pseudo_random(len, i as u64 + 1000 * d.len() as u64);
            fs::write(src.join(d).join(format!("f{i:03}")), data).unwrap();
        }
    }
    let snap = tmp.path().join("ws.hxz");
    let r = hexz_e2e::hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let cp = Command::new("cp").arg("-a").arg(&src).arg(&local).status();
    assert!(cp.unwrap().success());
    let log = tmp.path().join("server.log");
    // Two host handles at most: a file written loses its handle soon, so its next read
    // is a first read again, which a stale copy could answer.
    let mut m = Mount::with_log(tmp.path(), &snap, &["--max-node-handles", "2"], Some(&log));
    let change = |root: &Path, d: &str| {
        for i in 1..FILES {
            let p = root.join(d).join(format!("f{i:03}"));
            match i % 4 {
                0 => {} // left as it is
                1 => OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .write_all_at(b"WRITTEN", (i as u64 * 7) % 100)
                    .unwrap(),
                2 => {
                    let f = OpenOptions::new().write(true).open(&p).unwrap();
                    f.set_len(i as u64 % 50).unwrap();
                    f.set_len(5_000).unwrap();
                }
                _ => fs::write(&p, format!("replaced {i}")).unwrap(),
            }
        }
    };
    // Other tests drop the kernel's caches at any time; the kernel then forgets inodes,
    // and the daemon what it read ahead for them. Open descriptors keep them (and cost
    // nothing in no-open mode).
    let mut pins = Vec::new();
    for d in ["settled", "racing", "plain"] {
        let names: Vec<_> = fs::read_dir(m.path(d)).unwrap().collect();
        assert_eq!(names.len(), FILES);
        pins.push(File::open(m.path(d)).unwrap());
        for i in 0..FILES {
            pins.push(File::open(m.path(&format!("{d}/f{i:03}"))).unwrap());
        }
        let first = fs::read(m.path(&format!("{d}/f000"))).unwrap();
        assert_eq!(first, fs::read(local.join(d).join("f000")).unwrap());
        match d {
            "settled" => std::thread::sleep(Duration::from_millis(500)),
            "plain" => continue, // only read
            _ => {}
        }
        change(&m.mnt, d);
        change(&local, d);
    }
    let mut wrong = Vec::new();
    for d in ["settled", "racing", "plain"] {
        for i in 0..FILES {
            let name = format!("{d}/f{i:03}");
            let (a, b) = (
                fs::read(m.path(&name)).unwrap(),
                fs::read(local.join(&name)).unwrap(),
            );
            if a != b {
                let at = a.iter().zip(&b).position(|(x, y)| x != y);
                eprintln!(
                    "{name}: {} vs {} bytes, first difference at {at:?}",
                    a.len(),
                    b.len()
                );
                wrong.push(name);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} files read wrong: {wrong:?}",
        wrong.len()
    );
    drop(pins);
    // And the files not written came from copies read ahead: a `read_files` per
    // directory or so, not an `open` each. (Each file written needs its data handle
    // opened on the host, and again for each read after its handle was let go; each
    // other file would cost one open without read-ahead.)
    m.unmount();
    let ops = closed_connection_ops(&log);
    eprintln!("requests the host served: {ops:?}");
    let n = |k: &str| ops.get(k).copied().unwrap_or(0);
    let written = 2 * (1..FILES).filter(|i| i % 4 != 0).count() as u64;
    let unwritten = 3 * FILES as u64 - written;
    assert!(n("read_files") >= 3, "no files were read ahead: {ops:?}");
    assert!(
        n("open") < written + unwritten / 4,
        "{} opens for {written} files written and {unwritten} only read: the copies \
         read ahead were not used ({ops:?})",
        n("open"),
    );
}

#[test]
fn listings_read_ahead_of_a_walk_are_used_and_never_older_than_a_change() {
    if !fuse_available() {
        return;
    }
    // A tree of directories; walking down it makes the daemon list the next directories
    // ahead. Before the walk reaches them, some change through the mount — a name added,
    // removed, renamed in, a file's size — and every listing and `stat` must then match a
    // local copy changed the same way; the untouched ones come from the pages read ahead.
    // Afterwards (caches dropped) the server holds no more nodes than at the start: pages
    // not used gave their references back.
    let tmp = tempfile::tempdir().unwrap();
    let (snap, local) = packed_with_local_copy(tmp.path(), |src| {
        for a in 0..4 {
            for b in 0..6 {
                let d = src.join(format!("a{a}/b{b}"));
                fs::create_dir_all(d.join("c")).unwrap();
                for f in 0..5 {
                    fs::write(d.join(format!("f{f}")), vec![b'x'; 10 * f + a + b]).unwrap();
                }
            }
        }
    });
    let log = tmp.path().join("server.log");
    let guest_log = tmp.path().join("guest.log");
    let debug = format!("--debug-log={}", guest_log.display());
    let mut m = Mount::with_log(tmp.path(), &snap, &[&debug], Some(&log));
    let server = m.server.as_ref().unwrap();
    drop_caches();
    let before = live_nodes(server, &log);
    // Other tests drop the kernel's caches at any time, and the daemon gives back what
    // it read ahead for directories the kernel forgets: open descriptors keep them.
    let mut pins = vec![File::open(&m.mnt).unwrap()];
    for a in 0..4 {
        pins.push(File::open(m.path(&format!("a{a}"))).unwrap());
        for b in 0..6 {
            pins.push(File::open(m.path(&format!("a{a}/b{b}"))).unwrap());
        }
    }
    let names = |d: &Path| {
        let mut v: Vec<(String, u64, u32)> = fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = fs::symlink_metadata(e.path()).unwrap();
                let len = if md.is_dir() { 0 } else { md.len() }; // a directory's varies
                (e.file_name().to_string_lossy().into_owned(), len, md.mode())
            })
            .collect();
        v.sort();
        v
    };
    // Down into a0 and a0/b0: the rest of a0's subdirectories and a0's siblings are now
    // being listed ahead.
    names(&m.mnt);
    names(&m.path("a0"));
    names(&m.path("a0/b0"));
    std::thread::sleep(Duration::from_millis(300));
    let change = |root: &Path| {
        fs::write(root.join("a0/b1/new"), b"added").unwrap();
        fs::remove_file(root.join("a0/b2/f3")).unwrap();
        fs::rename(root.join("a0/b0/f1"), root.join("a0/b3/moved")).unwrap();
        OpenOptions::new()
            .append(true)
            .open(root.join("a0/b4/f2"))
            .unwrap()
            .write_all_at(b"longer now", 0)
            .unwrap();
    };
    // First attribute changes alone (setattr: a mode, a size), and a0/b5 listed right
    // after them: its page read ahead predates them.
    let set_attrs = |root: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root.join("a0/b5/f0"), fs::Permissions::from_mode(0o600)).unwrap();
        OpenOptions::new()
            .write(true)
            .open(root.join("a0/b5/f4"))
            .unwrap()
            .set_len(3)
            .unwrap();
    };
    set_attrs(&m.mnt);
    set_attrs(&local);
    assert_eq!(
        names(&m.path("a0/b5")),
        names(&local.join("a0/b5")),
        "a0/b5 after setattrs"
    );
    change(&m.mnt);
    change(&local);
    let mut wrong = Vec::new();
    for a in 0..4 {
        let d = format!("a{a}");
        if names(&m.path(&d)) != names(&local.join(&d)) {
            wrong.push(d.clone());
        }
        for b in 0..6 {
            let d = format!("a{a}/b{b}");
            if names(&m.path(&d)) != names(&local.join(&d)) {
                wrong.push(d);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "listings differ from a local copy: {wrong:?}"
    );
    let used = fs::read_to_string(&guest_log)
        .unwrap_or_default()
        .matches("listing from a page read ahead")
        .count();
    assert!(
        used >= 10,
        "only {used} listings came from pages read ahead"
    );
    drop(pins);
    nodes_settle_back(server, &log, before, "the walk");
    // The directories ahead were listed many per round trip (`list_dirs`), without host
    // handles: fewer directory handles opened than directories listed.
    m.unmount();
    let ops = closed_connection_ops(&log);
    eprintln!("requests the host served: {ops:?}");
    let n = |k: &str| ops.get(k).copied().unwrap_or(0);
    assert!(n("list_dirs") >= 1, "nothing was listed ahead: {ops:?}");
    assert!(
        n("opendir") < 29,
        "{} directory handles opened for 29 directories walked: {ops:?}",
        n("opendir")
    );
}

#[test]
fn lookups_answered_from_listings_match_a_local_copy_before_and_after_changes() {
    if !fuse_available() {
        return;
    }
    // Paths looked up one by one, with no listing (as `git status` and `make` do): the
    // daemon lists each directory once (`list_dirs`) and answers the lookups that follow
    // from it. Every `stat`, and every "no such name", must match a local copy, also
    // after changes through the mount that the listings held predate — the sharpest a
    // write through a hard link from another directory, which changes an entry no lookup
    // has taken yet. Afterwards (caches dropped) the server holds no more nodes than at
    // the start: listings held gave their references back.
    let tmp = tempfile::tempdir().unwrap();
    let (snap, local) = packed_with_local_copy(tmp.path(), |src| {
        for d in 0..4 {
            fs::create_dir_all(src.join(format!("d{d}/sub"))).unwrap();
            for f in 0..6 {
                fs::write(src.join(format!("d{d}/f{f}")), vec![b'x'; 7 * f + d]).unwrap();
            }
        }
        fs::hard_link(src.join("d0/f4"), src.join("d1/link")).unwrap();
    });
    let log = tmp.path().join("server.log");
    let mut m = Mount::with_log(tmp.path(), &snap, &[], Some(&log));
    let server = m.server.as_ref().unwrap();
    drop_caches();
    let before = live_nodes(server, &log);
    // Times of what the changes touch differ between the two copies (made at different
    // moments), and a directory's size is the file system's own.
    let touched = ["d1/link", "d0/f4", "d2/new", "d0/sub", "d0/sub/inside"];
    let stat = |root: &Path, p: &str| {
        fs::symlink_metadata(root.join(p))
            .map(|md| {
                let len = if md.is_dir() { 0 } else { md.len() };
                let t = (!touched.contains(&p)).then(|| (md.mtime(), md.mtime_nsec()));
                (len, md.mode(), md.nlink(), t)
            })
            .map_err(|e| e.kind())
    };
    let mut wrong = Vec::new();
    let mut check = |paths: &[&str], when: &str| {
        for p in paths {
            let (got, want) = (stat(&m.mnt, p), stat(&local, p));
            if got != want {
                wrong.push(format!("{when}: {p}: {got:?} vs {want:?}"));
            }
        }
    };
    // One name in each directory: its listing is now held, the other names untaken.
    check(
        &["d0/f0", "d1/f0", "d2/f0", "d3/f0", "d0/nope", "d3/sub/none"],
        "first",
    );
    // Changes through the mount, made the same way in the local copy.
    let change = |root: &Path| {
        OpenOptions::new()
            .append(true)
            .open(root.join("d1/link"))
            .unwrap()
            .write_all_at(b"through the link", 0)
            .unwrap();
        fs::write(root.join("d2/new"), b"made").unwrap();
        fs::remove_file(root.join("d3/f1")).unwrap();
        fs::write(root.join("d0/sub/inside"), b"in sub").unwrap();
    };
    change(&m.mnt);
    change(&local);
    let mut all = vec![
        "d1/link",
        "d2/new",
        "d3/f1",
        "d0/sub",
        "d0/sub/inside",
        "d2/f9",
    ];
    let names: Vec<String> = (0..4)
        .flat_map(|d| (0..6).map(move |f| format!("d{d}/f{f}")))
        .collect();
    all.extend(names.iter().map(String::as_str));
    check(&all, "after the changes");
    // Once more with the kernel's caches dropped: fresh listings, all names looked up.
    drop_caches();
    check(&all, "after a cache drop");
    assert!(
        wrong.is_empty(),
        "stat differs from a local copy:\n{}",
        wrong.join("\n")
    );
    nodes_settle_back(server, &log, before, "the lookups");
    m.unmount();
    let ops = closed_connection_ops(&log);
    eprintln!("requests the host served: {ops:?}");
    let n = |k: &str| ops.get(k).copied().unwrap_or(0);
    assert!(
        n("list_dirs") >= 4,
        "no directory was listed for lookups: {ops:?}"
    );
    assert!(
        n("lookup") < 40,
        "{} lookups sent for 66 paths stat'ed: {ops:?}",
        n("lookup")
    );
}

/// A tree made by `build` in `dir/src`, packed into `dir/ws.hxz` and copied (`cp -a`)
/// to `dir/local`: the snapshot and the local copy to compare the mount with.
fn packed_with_local_copy(dir: &Path, build: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    let local = dir.join("local");
    fs::create_dir_all(&src).unwrap();
    build(&src);
    let snap = dir.join("ws.hxz");
    let r = hexz_e2e::hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&local)
        .status()
        .unwrap()
        .success());
    (snap, local)
}

/// Every node under `root` (the root itself left out), by relative path: what `f` makes
/// of its path and metadata (not following symlinks), where it makes anything.
fn tree_walk<T>(
    root: &Path,
    mut f: impl FnMut(&Path, &fs::Metadata) -> Option<T>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p.clone());
            }
            if let Some(v) = f(&p, &m) {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), v);
            }
        }
    }
    out
}

/// Every regular file under `root`, with its contents, by relative path.
fn tree_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    tree_walk(root, |p, m| (!m.is_dir()).then(|| fs::read(p).unwrap()))
}

#[test]
fn creates_and_unlinks_answered_early_are_exact_and_reach_the_host_before_unmount() {
    if !fuse_available() {
        return;
    }
    // Files created in directories this mount made are answered before the host has
    // made them (write-behind), with their first bytes; so are unlinks. Whatever mix of
    // early and ordinary requests a workload makes, the tree must read as a local copy
    // does — through this mount, after the caches are dropped, and through a new mount
    // after this one was unmounted straight after the last change.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let local = tmp.path().join("local");
    let log = tmp.path().join("serve.log");
    let mut m = Mount::with_log(tmp.path(), &snap, &[], Some(&log));
    let both = |rel: &str, f: &dyn Fn(&Path)| {
        f(&m.path(rel));
        f(&local.join(rel));
    };
    for d in ["w", "w/sub"] {
        both(d, &|p| fs::create_dir_all(p).unwrap());
    }
    for i in 0..300usize {
        let dir = if i % 3 == 0 { "w/sub" } else { "w" };
        // Empty, small, exactly 64 KiB, and larger than what is answered early.
        let len = [0, 1, 100, 4096, 65_536, 65_537, 200_000][i % 7] + i % 5;
        let data = pseudo_random(len, i as u64);
        both(&format!("{dir}/f{i:03}"), &|p| fs::write(p, &data).unwrap());
        if i % 4 == 1 {
            // More bytes at the end (continuing what was answered early, or not).
            let more = pseudo_random(3000, 7 + i as u64);
            both(&format!("{dir}/f{i:03}"), &|p| {
                use std::io::Write;
                let mut f = OpenOptions::new().append(true).open(p).unwrap();
                f.write_all(&more).unwrap();
            });
        }
        if i % 5 == 2 {
            both(&format!("{dir}/f{i:03}"), &|p| fs::remove_file(p).unwrap());
        }
        if i % 10 == 2 {
            // The same name again, other bytes.
            let again = pseudo_random(50 + i, 99 + i as u64);
            both(&format!("{dir}/f{i:03}"), &|p| {
                fs::write(p, &again).unwrap()
            });
        }
        if i % 11 == 0 && i % 5 != 2 {
            both(&format!("{dir}/f{i:03}"), &|p| {
                fs::rename(p, p.with_extension("moved")).unwrap()
            });
        }
        if i % 13 == 0 {
            // Written in place and truncated, through one descriptor.
            let p = format!("{dir}/g{i:03}");
            both(&p, &|p| {
                let f = File::create(p).unwrap();
                f.write_all_at(b"0123456789", 0).unwrap();
                f.write_all_at(b"ab", 3).unwrap();
                f.set_len(7).unwrap();
            });
        }
    }
    let want = tree_files(&local.join("w"));
    assert!(want.len() > 200, "{} files", want.len());
    assert!(
        tree_files(&m.path("w")) == want,
        "the mount differs from the local copy"
    );
    drop_caches();
    assert!(
        tree_files(&m.path("w")) == want,
        "after dropping the caches, the mount differs from the local copy"
    );
    // The last changes, then unmount at once: they reach the host first.
    for i in 0..100usize {
        both(&format!("w/last{i:03}"), &|p| {
            fs::write(p, i.to_string()).unwrap()
        });
    }
    for i in 0..50usize {
        both(&format!("w/last{i:03}"), &|p| fs::remove_file(p).unwrap());
    }
    m.unmount();
    let ops = closed_connection_ops(&log);
    assert!(ops.get("batch").copied().unwrap_or(0) > 0, "{ops:?}");
    assert!(
        ops.get("create").copied().unwrap_or(0) < 50,
        "creates were not answered early: {ops:?}"
    );
    assert!(
        ops.get("unlink").copied().unwrap_or(0) < 20,
        "unlinks were not answered early: {ops:?}"
    );
    drop(m);
    let m = Mount::new(tmp.path(), &snap, &[]);
    let want = tree_files(&local.join("w"));
    assert!(
        tree_files(&m.path("w")) == want,
        "after unmounting, a new mount differs from the local copy"
    );
}

/// `f` of a second daemon's mount at `mnt2`, on `m`'s server: what the host has, seen
/// by a daemon that remembers nothing. The second mount is gone when this returns.
fn through_second_daemon<T>(m: &Mount, mnt2: &Path, f: impl FnOnce(&Path) -> T) -> T {
    fs::create_dir_all(mnt2).unwrap();
    let mut second = spawn_guest(mnt2, &m.socket, &[]);
    let mounted = eventually(30, || is_mounted(mnt2));
    let seen = mounted.then(|| f(mnt2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let _ = second.wait();
    if is_mounted(mnt2) {
        let c = std::ffi::CString::new(mnt2.to_str().unwrap()).unwrap();
        // SAFETY: detaching a mount this test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    seen.expect("the second mount")
}

/// What a directory of the mount shows: each name with its size and bytes.
fn dir_view(dir: &Path) -> BTreeMap<String, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if let (Ok(m), Ok(b)) = (fs::metadata(&p), fs::read(&p)) {
            out.insert(e.file_name().to_string_lossy().into_owned(), (m.len(), b));
        }
    }
    out
}

#[test]
fn unlinks_answered_early_that_never_reached_the_host_show_the_hosts_files_again() {
    if !fuse_available() {
        return;
    }
    // Files made and synced through the mount, then unlinked — answered early, queued —
    // while the server is stopped; the server is killed (the batch is lost) and started
    // again. The host still has the files, so the mount must show them again: it must
    // stop answering "no such name" in that directory from memory.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let guest_log = tmp.path().join("guest.log");
    let debug = format!("--debug-log={}", guest_log.display());
    let mut m = Mount::new(
        tmp.path(),
        &snap,
        &["--negative-ttl", "30", "--timeout", "5", &debug],
    );
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..10 {
        fs::write(m.path(&format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    File::open(m.path("d")).unwrap().sync_all().unwrap();
    let server = m.server.as_ref().unwrap().child.id();
    // SAFETY: stopping our own child.
    unsafe { libc::kill(server as i32, libc::SIGSTOP) };
    for i in 0..5 {
        fs::remove_file(m.path(&format!("d/f{i}"))).unwrap();
    }
    // Looked up meanwhile: answered "no such name" from memory, which the kernel keeps
    // for the negative TTL (30 s) unless told otherwise.
    for i in 0..5 {
        assert!(!m.path(&format!("d/f{i}")).exists());
    }
    std::thread::sleep(Duration::from_millis(200)); // the batch leaves, and waits
    m.restart_server_after_kill9();
    let log = fs::read_to_string(&guest_log).unwrap_or_default();
    assert!(
        log.contains("write-behind: removing"),
        "no unlink was answered early and then lost:\n{log}"
    );
    // The host's view, from a second daemon that remembers nothing.
    let host = through_second_daemon(&m, &tmp.path().join("mnt2"), |mnt2| {
        dir_view(&mnt2.join("d"))
    });
    assert_eq!(
        host.len(),
        10,
        "the host lost the unlinks: {:?}",
        host.keys()
    );
    // By name first: a listing would show the mount the names again by itself.
    let by_name = |i: usize| m.path(&format!("d/f{i}"));
    let found = eventually(10, || (0..10).all(|i| by_name(i).exists()));
    assert!(
        found,
        "by name, f0..f9 exist: {:?}; the host has {:?}",
        (0..10).map(|i| by_name(i).exists()).collect::<Vec<_>>(),
        host.keys().collect::<Vec<_>>()
    );
    assert!(
        dir_view(&m.path("d")) == host,
        "the mount's d differs from the host's"
    );
}

#[test]
fn a_create_answered_early_that_the_host_then_refuses_fails_fsync() {
    if !fuse_available() {
        return;
    }
    // The overlay has room for about one of the files below: creates answered early
    // whose data the host then has no room for must make fsync on the file and on its
    // directory fail (EIO), and the mount must say so in its log.
    let tmp = tempfile::tempdir().unwrap();
    let snap = fixture(tmp.path());
    let guest_log = tmp.path().join("guest.log");
    let debug = format!("--debug-log={}", guest_log.display());
    let m = Mount::with_server(
        tmp.path(),
        &snap,
        &[&debug],
        None,
        &["--overlay-size", "200K"],
    );
    fs::create_dir(m.path("d")).unwrap();
    let data = pseudo_random(60_000, 5);
    let mut answered = Vec::new();
    for i in 0..8 {
        let p = m.path(&format!("d/f{i}"));
        // Early answers succeed; once write-behind stopped, the host's ENOSPC comes in
        // time, at the write.
        if fs::write(&p, &data).is_ok() {
            answered.push(p);
        }
    }
    assert!(answered.len() >= 2, "{} files written", answered.len());
    let fsync = |p: &Path| File::open(p).and_then(|f| f.sync_all());
    let failed: Vec<_> = answered.iter().filter(|p| fsync(p).is_err()).collect();
    assert!(
        !failed.is_empty(),
        "every fsync succeeded, but the overlay cannot hold {} files of 60 kB",
        answered.len()
    );
    let e = fsync(&m.path("d")).expect_err("fsync of the directory");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = fs::read_to_string(&guest_log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("write-behind: creating") && l.contains("ENOSPC")),
        "the daemon's log does not say which create failed:\n{log}"
    );
    // Every file that fsync accepted is whole.
    for p in &answered {
        if !failed.contains(&p) {
            assert!(fs::read(p).unwrap() == data, "{} is not whole", p.display());
        }
    }
    // And the mount shows what the host has, not what it answered: a file the host could
    // not create is gone, one whose bytes it could not keep shows the bytes it has. A
    // second daemon on the same server, which remembers nothing, shows the host's view.
    let view = |root: &Path| -> Vec<Option<(u64, Vec<u8>)>> {
        (0..8)
            .map(|i| {
                let p = root.join(format!("d/f{i}"));
                Some((fs::metadata(&p).ok()?.len(), fs::read(&p).ok()?))
            })
            .collect()
    };
    let host = through_second_daemon(&m, &tmp.path().join("mnt2"), view);
    assert!(
        host.iter()
            .any(|v| v.as_ref().map(|(_, b)| &b[..]) != Some(&data[..])),
        "the host holds every file whole; nothing was refused"
    );
    let same = eventually(10, || view(&m.mnt) == host);
    assert!(
        same,
        "the mount still shows files or bytes the host refused: {:?} vs the host's {:?}",
        view(&m.mnt)
            .iter()
            .map(|v| v.as_ref().map(|(n, b)| (*n, b.len())))
            .collect::<Vec<_>>(),
        host.iter()
            .map(|v| v.as_ref().map(|(n, b)| (*n, b.len())))
            .collect::<Vec<_>>()
    );
}

/// Size, mode, owner and contents of every node under `root` (the root itself left
/// out), by relative path; symlinks by their target.
fn tree_meta(root: &Path) -> BTreeMap<String, (u64, u32, u32, u32, Vec<u8>)> {
    tree_walk(root, |p, m| {
        let body = if m.is_dir() {
            Vec::new()
        } else if m.file_type().is_symlink() {
            fs::read_link(p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else {
            fs::read(p).unwrap()
        };
        let size = if m.is_dir() { 0 } else { m.len() };
        Some((size, m.mode(), m.uid(), m.gid(), body))
    })
}

#[test]
fn writes_in_listed_snapshot_directories_are_answered_early_and_exact() {
    if !fuse_available() {
        return;
    }
    // Directories of the snapshot whose whole listing the daemon got become "complete":
    // a name they lack is answered absent without the host, and a file created there is
    // answered early with its first 64 KiB written at any offset, as an assembler
    // writes an object file (sections first, the header last, reading back between).
    // Everything must match a local copy that got the same calls — sizes, modes,
    // owners (a set-group-ID directory gives its group to what is made in it) and bytes
    // — read back while writing, after the caches are dropped, and through a new mount.
    let tmp = tempfile::tempdir().unwrap();
    let (snap, local) = packed_with_local_copy(tmp.path(), |src| {
        for d in ["p", "q/deep", "g"] {
            fs::create_dir_all(src.join(d)).unwrap();
            for f in 0..5 {
                fs::write(src.join(format!("{d}/s{f}.c")), vec![b'c'; 40 * f]).unwrap();
            }
        }
        let g = src.join("g");
        std::os::unix::fs::chown(&g, None, Some(4321)).unwrap();
        fs::set_permissions(&g, fs::Permissions::from_mode(0o2775)).unwrap();
    });
    let log = tmp.path().join("serve.log");
    let mut m = Mount::with_log(tmp.path(), &snap, &[], Some(&log));
    let both = |rel: &str, f: &dyn Fn(&Path)| {
        f(&m.path(rel));
        f(&local.join(rel));
    };
    // A plain create first (the daemon learns the host's entry shape from its reply).
    both("first", &|p| fs::write(p, b"1").unwrap());
    // `p` is listed for a lookup of a name it lacks, `q/deep` by a listing, `g` both.
    for (i, d) in ["p", "q/deep", "g"].iter().enumerate() {
        if i != 1 {
            both(&format!("{d}/nothing.h"), &|p| {
                assert_eq!(
                    fs::metadata(p).unwrap_err().kind(),
                    std::io::ErrorKind::NotFound
                )
            });
        }
        if i != 0 {
            both(d, &|p| assert_eq!(fs::read_dir(p).unwrap().count(), 5));
        }
        // A name too long is that, not absent (pjdfstest's unlink/02.t, rmdir/02.t).
        both(&format!("{d}/{}", "x".repeat(256)), &|p| {
            assert_eq!(
                mount_suite::errno_of(fs::remove_file(p)),
                libc::ENAMETOOLONG
            )
        });
    }
    for (i, d) in ["p", "q/deep", "g"].iter().enumerate() {
        for f in 0..12usize {
            // Header last, sections first, gaps between; one file past 64 KiB.
            let big = f == 11;
            let parts: Vec<(u64, Vec<u8>)> = vec![
                (680, pseudo_random(44 + f, 1 + f as u64)),
                (64, pseudo_random(285, 2 + i as u64)),
                (if big { 70_000 } else { 1500 }, pseudo_random(300, 3)),
                (352, pseudo_random(112, 4 + f as u64)),
                (0, pseudo_random(64, 5)),
            ];
            let name = format!("{d}/o{f}.o");
            let seen: Vec<Vec<(u64, Vec<u8>)>> = [m.path(&name), local.join(&name)]
                .iter()
                .map(|p| {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(p)
                        .unwrap();
                    let mut seen = Vec::new();
                    for (off, bytes) in &parts {
                        file.write_all_at(bytes, *off).unwrap();
                        let len = file.metadata().unwrap().len();
                        let mut back = vec![0; len.min(4096) as usize];
                        file.read_exact_at(&mut back, 0).unwrap();
                        seen.push((len, back));
                    }
                    seen
                })
                .collect();
            assert!(
                seen[0] == seen[1],
                "{name}: read back while writing differs"
            );
        }
        both(&format!("{d}/made"), &|p| fs::create_dir(p).unwrap());
        both(&format!("{d}/link"), &|p| {
            std::os::unix::fs::symlink("o1.o", p).unwrap()
        });
        both(&format!("{d}/s1.c"), &|p| fs::remove_file(p).unwrap());
    }
    let want = tree_meta(&local);
    assert!(
        tree_meta(&m.path("")) == want,
        "the mount differs from the local copy"
    );
    let g = &want["g/o3.o"];
    assert_eq!(
        g.3, 4321,
        "a file made in a set-group-ID directory gets its group"
    );
    assert_eq!(want["g/made"].1 & 0o2000, 0o2000, "and a directory the bit");
    drop_caches();
    assert!(
        tree_meta(&m.path("")) == want,
        "after dropping the caches, the mount differs from the local copy"
    );
    m.unmount();
    let ops = closed_connection_ops(&log);
    // 36 creates and 180 writes, 165 of them to the first 64 KiB of a new file; 50
    // lookups of names that are not there.
    for (op, most) in [("create", 3), ("lookup", 3), ("write", 15)] {
        assert!(
            ops.get(op).copied().unwrap_or(0) <= most,
            "{op}s were not answered early: {ops:?}"
        );
    }
    drop(m);
    let m = Mount::new(tmp.path(), &snap, &[]);
    assert!(
        tree_meta(&m.path("")) == want,
        "after unmounting, a new mount differs from the local copy"
    );
}
