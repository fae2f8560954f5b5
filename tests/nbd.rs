//! `hexz-host nbd` driven by real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io,
//! nbdfuse, and a hand-rolled client for malformed traffic. A test whose client tool is
//! missing says so and returns, unless `CI` is set (CI installs them), where it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hexz_e2e::{bin, hexz_host, pseudo_random};

const SIZE: usize = 64 << 20;

/// True when every tool is on PATH; otherwise explains, and fails under CI.
fn have(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = format!(
                "{t} is not installed (apt-get install libnbd-bin nbdkit qemu-utils fuse3)"
            );
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping: {why}");
            return false;
        }
    }
    true
}

/// A sparse 64 MiB disk image with random data in a few places, and its snapshot.
fn image(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut img = vec![0u8; SIZE];
    for (i, (at, len)) in [
        (0usize, 100_000usize),
        (5 << 20, 3 << 20),
        (40 << 20, 1 << 20),
        (SIZE - 4096, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        img[at..at + len].copy_from_slice(&pseudo_random(len, i as u64 + 1));
    }
    let raw = dir.join("disk.img");
    let f = std::fs::File::create(&raw).expect("create image");
    f.set_len(SIZE as u64).expect("size image");
    use std::os::unix::fs::FileExt;
    for at in (0..SIZE).step_by(1 << 20) {
        let part = &img[at..at + (1 << 20)];
        if part.iter().any(|&b| b != 0) {
            f.write_all_at(part, at as u64).expect("write image");
        }
    }
    let snap = dir.join("disk.hxz");
    let r = hexz_host(&[&"pack", &"--disk", &raw, &"-o", &snap]);
    assert_eq!(r.status, 0, "pack: {}", r.stderr);
    (raw, snap, img)
}

/// A running `hexz-host nbd` on a Unix socket; SIGTERM and reaped on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(snap: &Path, socket: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin("hexz-host"))
            .arg("nbd")
            .arg(snap)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hexz-host nbd");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read banner");
        assert!(line.contains("serving"), "server did not start: {line:?}");
        Server {
            child,
            socket: socket.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdinfo_reports_size_list_and_a_hole_in_the_map() {
    if !have(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, _) = image(dir.path());
    let srv = Server::start(&snap, &dir.path().join("s"), &["--name", "disk0"]);
    let url = format!("nbd+unix:///disk0?socket={}", srv.socket.display());
    let info = run("nbdinfo", &[&url]);
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    assert!(
        info.contains("is_read_only: true") && info.contains("base:allocation"),
        "{info}"
    );
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
    let list = run("nbdinfo", &["--list", &srv.url()]);
    assert!(list.contains("export=\"disk0\""), "{list}");
    let map = run("nbdinfo", &["--map", &url]);
    let holes: Vec<&str> = map.lines().filter(|l| l.contains("hole,zero")).collect();
    assert!(map.lines().any(|l| l.ends_with("data")), "{map}");
    assert!(
        holes
            .iter()
            .any(|l| l.split_whitespace().next() == Some("8388608")),
        "{map}"
    );
    let wrong = Command::new("nbdinfo")
        .arg(format!(
            "nbd+unix:///nosuch?socket={}",
            srv.socket.display()
        ))
        .output()
        .expect("nbdinfo");
    assert!(
        !wrong.status.success(),
        "an unknown export name must be refused"
    );
}

#[test]
fn nbdcopy_of_the_export_equals_the_source_image() {
    if !have(&["nbdcopy", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw, snap, img) = image(dir.path());
    let srv = Server::start(&snap, &dir.path().join("s"), &[]);
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&srv.url(), copy.to_str().expect("utf8")]);
    assert!(
        std::fs::read(&copy).expect("read copy") == img,
        "copy differs from the image"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            raw.to_str().expect("utf8"),
            &srv.url(),
        ],
    );
}

#[test]
fn qemu_io_writes_read_back_through_the_overlay() {
    if !have(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, mut img) = image(dir.path());
    let ov = dir.path().join("ov");
    let ovs = ov.to_str().expect("utf8");
    let srv = Server::start(&snap, &dir.path().join("s"), &["--rw", "--overlay", ovs]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 1M",
            "-c",
            "write -z 6M 2M",
            "-c",
            "flush",
            &srv.url(),
        ],
    );
    img[1000..1000 + (1 << 20)].fill(0xab);
    img[6 << 20..8 << 20].fill(0);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1000 1M",
            "-c",
            "read -P 0 6M 2M",
            &srv.url(),
        ],
    );
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&srv.url(), copy.to_str().expect("utf8")]);
    assert!(
        std::fs::read(&copy).expect("read copy") == img,
        "copy differs from the written image"
    );
    let ro = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(Server::start(&snap, &dir.path().join("r"), &[]).url())
        .output()
        .expect("qemu-io");
    assert!(
        !ro.status.success() || !String::from_utf8_lossy(&ro.stdout).contains("wrote"),
        "a read-only export took a write"
    );
}

#[test]
fn flushed_writes_survive_kill_9_and_a_restart_with_the_same_overlay() {
    if !have(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, _) = image(dir.path());
    let ov = dir.path().join("ov");
    let ovs = ov.to_str().expect("utf8");
    let sock = dir.path().join("s");
    let srv = Server::start(&snap, &sock, &["--rw", "--overlay", ovs]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 12345 300k",
            "-c",
            "discard 40M 1M",
            "-c",
            "flush",
            &srv.url(),
        ],
    );
    srv.kill9();
    let srv = Server::start(&snap, &sock, &["--rw", "--overlay", ovs]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 12345 300k",
            "-c",
            "read -P 0 40M 1M",
            &srv.url(),
        ],
    );
}

#[test]
fn nbdfuse_serves_the_export_as_a_readable_file() {
    if !have(&["nbdfuse", "fusermount3"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, img) = image(dir.path());
    let srv = Server::start(&snap, &dir.path().join("s"), &[]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let pidfile = dir.path().join("pid");
    let mut fuse = Command::new("nbdfuse")
        .arg("-r")
        .arg("-P")
        .arg(&pidfile)
        .arg(&mnt)
        .arg(srv.url())
        .spawn()
        .expect("spawn nbdfuse");
    let start = Instant::now();
    while !pidfile.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = std::fs::read(mnt.join("nbd"));
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let _ = fuse.wait();
    let got = got.expect("read the nbdfuse file");
    assert!(got == img, "nbdfuse file differs from the image");
}

/// A raw client: fixed newstyle, no zeroes, EXPORT_NAME "" → (stream, size).
fn raw_client(sock: &Path) -> (UnixStream, u64) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("export name");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).expect("export reply");
    let mut sz = [0u8; 8];
    sz.copy_from_slice(&r[..8]);
    (s, u64::from_be_bytes(sz))
}

fn request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v).expect("send request");
}

/// A simple reply: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("reply");
    assert_eq!(r[..4], 0x6744_6698u32.to_be_bytes());
    let mut c = [0u8; 8];
    c.copy_from_slice(&r[8..]);
    (
        u32::from_be_bytes([r[4], r[5], r[6], r[7]]),
        u64::from_be_bytes(c),
    )
}

fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn malformed_traffic_gets_errors_or_a_clean_close_and_other_clients_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, img) = image(dir.path());
    let sock = dir.path().join("s");
    let _srv = Server::start(&snap, &sock, &[]);

    // Unknown client flags: the server hangs up.
    let mut s = UnixStream::connect(&sock).expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&0xffff_0000u32.to_be_bytes()).expect("flags");
    assert!(closed(&mut s));

    // An unknown option is refused with NBD_REP_ERR_UNSUP and the handshake goes on.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&99u32.to_be_bytes());
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(b"abc");
    s.write_all(&opt).expect("option");
    let mut r = [0u8; 20];
    s.read_exact(&mut r).expect("option reply");
    assert_eq!(r[12..16], 0x8000_0001u32.to_be_bytes(), "NBD_REP_ERR_UNSUP");
    let len = u32::from_be_bytes([r[16], r[17], r[18], r[19]]);
    let mut msg = vec![0u8; len as usize];
    s.read_exact(&mut msg).expect("message");

    // Bad requests get errors and no data; the connection stays in sync.
    let (mut c, size) = raw_client(&sock);
    assert_eq!(size, SIZE as u64);
    request(&mut c, 0, 1, size - 10, 20, &[]);
    assert_eq!(reply(&mut c), (22, 1), "read past the end: EINVAL");
    request(&mut c, 0, 2, 0, 64 << 20, &[]);
    assert_eq!(
        reply(&mut c),
        (22, 2),
        "read above the limit: EINVAL (simple replies)"
    );
    request(&mut c, 1, 3, 0, 4, b"abcd");
    assert_eq!(reply(&mut c), (1, 3), "write to a read-only export: EPERM");
    request(&mut c, 42, 4, 0, 0, &[]);
    assert_eq!(reply(&mut c), (22, 4), "unknown command: EINVAL");
    request(&mut c, 0, 5, (5 << 20) + 7, 1000, &[]);
    assert_eq!(reply(&mut c), (0, 5));
    let mut data = vec![0u8; 1000];
    c.read_exact(&mut data).expect("data");
    assert!(data[..] == img[(5 << 20) + 7..(5 << 20) + 1007]);

    // Garbage instead of a request: the server closes this connection only.
    c.write_all(&[0x42; 28]).expect("garbage");
    assert!(closed(&mut c));
    // An oversized write cannot be skipped safely: closed too.
    let (mut c, _) = raw_client(&sock);
    request(&mut c, 1, 6, 0, 1 << 30, &[]);
    assert!(closed(&mut c));

    let (mut c, _) = raw_client(&sock);
    request(&mut c, 0, 7, 0, 4096, &[]);
    assert_eq!(reply(&mut c), (0, 7));
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data).expect("data");
    assert!(data[..] == img[..4096], "another client is unaffected");
    request(&mut c, 2, 8, 0, 0, &[]);
    assert!(closed(&mut c), "NBD_CMD_DISC closes");
}

#[test]
fn bad_invocations_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raw, snap, _) = image(dir.path());
    let sock = dir.path().join("s");
    let sock_arg = format!("unix:{}", sock.display());

    let r = hexz_host(&[
        &"nbd",
        &snap,
        &"--stream",
        &"memory",
        &"--listen",
        &sock_arg,
    ]);
    assert!(
        r.status != 0 && r.stderr.contains("stream 'memory'") && r.stderr.contains("it has: disk"),
        "{}",
        r.stderr
    );

    let r = hexz_host(&[&"nbd", &snap, &"--listen", &"0.0.0.0:0"]);
    assert!(
        r.status != 0 && r.stderr.contains("not a loopback address"),
        "{}",
        r.stderr
    );

    let r = hexz_host(&[&"nbd", &snap, &"--rw", &"--listen", &sock_arg]);
    assert!(
        r.status != 0 && r.stderr.contains("--overlay"),
        "{}",
        r.stderr
    );

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    std::fs::write(tree.join("f"), b"x").expect("write");
    let tree_snap = dir.path().join("tree.hxz");
    assert_eq!(hexz_host(&[&"pack", &tree, &"-o", &tree_snap]).status, 0);
    let r = hexz_host(&[&"nbd", &tree_snap, &"--listen", &sock_arg]);
    assert!(
        r.status != 0 && r.stderr.contains("only a file tree"),
        "{}",
        r.stderr
    );

    // An overlay made for one snapshot is refused for another.
    let ov = dir.path().join("ov");
    let ovs = ov.to_str().expect("utf8");
    drop(Server::start(&snap, &sock, &["--rw", "--overlay", ovs]));
    let other = dir.path().join("other.hxz");
    std::fs::write(&raw, pseudo_random(1 << 20, 99)).expect("rewrite image");
    assert_eq!(
        hexz_host(&[&"pack", &"--disk", &raw, &"-o", &other]).status,
        0
    );
    let r = hexz_host(&[
        &"nbd",
        &other,
        &"--rw",
        &"--overlay",
        &ovs,
        &"--listen",
        &sock_arg,
    ]);
    assert!(
        r.status != 0 && r.stderr.contains("belongs to snapshot"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn pipelined_requests_on_one_connection_each_get_their_own_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, img) = image(dir.path());
    let _srv = Server::start(&snap, &dir.path().join("s"), &[]);
    let (mut c, _) = raw_client(&dir.path().join("s"));
    let reqs: Vec<(u64, u64, u32)> = (0..64u64)
        .map(|i| {
            (
                1000 + i,
                (i * 997 * 4096) % (SIZE as u64 - (1 << 20)),
                4096 + (i as u32 % 7) * 65536,
            )
        })
        .collect();
    for &(cookie, off, len) in &reqs {
        request(&mut c, 0, cookie, off, len, &[]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in &reqs {
        let (err, cookie) = reply(&mut c);
        assert_eq!(err, 0);
        let &(_, off, len) = reqs.iter().find(|r| r.0 == cookie).expect("known cookie");
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data).expect("data");
        assert!(
            data[..] == img[off as usize..off as usize + len as usize],
            "cookie {cookie}"
        );
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
}

#[test]
fn sigterm_flushes_acknowledged_writes_of_a_connected_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, _) = image(dir.path());
    let sock = dir.path().join("s");
    let ov = dir.path().join("ov");
    let ovs = ov.to_str().expect("utf8");
    let srv = Server::start(&snap, &sock, &["--rw", "--overlay", ovs]);
    let (mut c, _) = raw_client(&sock);
    request(&mut c, 1, 1, 8192 + 5, 6, b"sigter");
    assert_eq!(reply(&mut c), (0, 1));
    drop(srv); // SIGTERM while the client is still connected, no NBD_CMD_FLUSH sent
    drop(c);
    let _srv = Server::start(&snap, &sock, &["--rw", "--overlay", ovs]);
    let (mut c, _) = raw_client(&sock);
    request(&mut c, 0, 2, 8192 + 5, 6, &[]);
    assert_eq!(reply(&mut c), (0, 2));
    let mut data = [0u8; 6];
    c.read_exact(&mut data).expect("data");
    assert_eq!(&data, b"sigter");
}

#[test]
fn a_32_mib_read_returns_the_image_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, snap, img) = image(dir.path());
    let _srv = Server::start(&snap, &dir.path().join("s"), &[]);
    let (mut c, _) = raw_client(&dir.path().join("s"));
    let off = (3 << 20) + 512;
    request(&mut c, 0, 9, off as u64, 32 << 20, &[]);
    assert_eq!(reply(&mut c), (0, 9));
    let mut data = vec![0u8; 32 << 20];
    c.read_exact(&mut data).expect("data");
    assert!(data[..] == img[off..off + (32 << 20)]);
}
