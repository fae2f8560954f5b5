//! A hostile guest against a real `hexz-host serve` (Unix socket): path escapes, symlink
//! chains and loops, forged and stale ids and handles, requests after forget, bad frames,
//! deep CBOR nesting, absurd sizes and offsets, handle and reference floods, 1,000
//! connections, a client that never reads. Measured: escapes (a canary file beside the
//! snapshot, watched with inotify, must never be opened, read, changed or gained a
//! neighbour; no reply may carry its bytes), crashes (the server must stay up through
//! everything) and the server's peak RSS (VmHWM), which must stay under a stated bound.
//!
//! `HEXZ_HOSTILE_LOOKUPS` sets the size of the reference flood (default 250,000; the recorded run used 3,000,000).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

/// A unique token in the canary file: no reply may ever contain it.
const TOKEN: &[u8] = b"CANARY-7f3a9c1e-do-not-serve";
/// The bound asserted on the server's peak resident set (VmHWM) over the whole test.
const RSS_BOUND_KIB: u64 = 256 << 10;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    snap: PathBuf,
    canary: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let canary = dir.join("canary.txt");
        let mut body = TOKEN.to_vec();
        body.extend_from_slice(&pseudo_random(10_000, 99));
        fs::write(&canary, &body).unwrap();
        let src = dir.join("src");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::write(src.join("README.md"), b"# hostile\n").unwrap();
        fs::write(src.join("sub/a.txt"), pseudo_random(70_000, 1)).unwrap();
        // Symlinks that would escape if anything followed them: absolute to the canary,
        // relative up and out, a chain ending outside, a loop, a self-loop.
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, src.join(name)).unwrap();
        };
        link(canary.to_str().unwrap(), "abs-canary");
        link("../canary.txt", "rel-canary");
        link("../../../../../../../../../canary.txt", "far-canary");
        link("chain2", "chain1");
        link("chain3", "chain2");
        link("sub/../../canary.txt", "chain3");
        link("loop-b", "loop-a");
        link("loop-a", "loop-b");
        link("self", "self");
        link("/", "root-link");
        link(dir.to_str().unwrap(), "outside-dir");
        let snap = dir.join("ws.hxz");
        let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
        assert_eq!(r.status, 0, "{}", r.stderr);
        Fixture {
            _tmp: tmp,
            dir,
            snap,
            canary,
        }
    }
}

/// Watches the directory holding the snapshot and the canary: every event names a file.
struct Watch {
    fd: i32,
}

impl Watch {
    fn new(dir: &Path) -> Watch {
        // SAFETY: plain syscalls on a descriptor we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_OPEN
            | libc::IN_ACCESS
            | libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_CLOSE_WRITE;
        // SAFETY: `c` is a valid C string; `fd` is ours.
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
        assert!(wd >= 0, "inotify_add_watch");
        Watch { fd }
    }

    /// (name, mask) of every event so far.
    fn events(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + 16..at + 16 + len];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                out.push((String::from_utf8_lossy(name).into_owned(), mask));
                at += 16 + len;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn frame_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, 16 << 20, &mut out).unwrap();
    out
}

fn hello_frame() -> Vec<u8> {
    frame_of(&Request {
        id: 1,
        op: Op::Hello(default_hello()),
    })
}

fn read_reply(s: &mut UnixStream) -> Option<Reply> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    decode_reply(&body).ok()
}

/// A connection that said hello, for raw frames.
fn raw_session(socket: &Path) -> UnixStream {
    let mut s = raw(socket, &hello_frame());
    assert!(matches!(
        read_reply(&mut s).map(|r| r.r),
        Some(ReplyBody::Hello(_))
    ));
    s
}

fn no_token(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.windows(TOKEN.len()).any(|w| w == TOKEN),
        "{what}: a reply carried the canary's bytes (an escape)"
    );
}

/// Every reply body's bytes are checked for the canary token.
fn call(c: &mut Client, op: Op) -> ReplyBody {
    let r = c.call(op);
    no_token("reply", &frame_of(&r));
    r
}

fn is_err(r: &ReplyBody) -> bool {
    matches!(r, ReplyBody::Err(_))
}

#[test]
fn a_hostile_guest_gets_errors_never_an_escape_a_crash_or_unbounded_memory() {
    let fx = Fixture::new();
    let before: BTreeSet<_> = fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let canary_meta = fs::metadata(&fx.canary).unwrap();
    let canary_bytes = fs::read(&fx.canary).unwrap();
    let ov = fx.dir.join("ov");
    let watch = Watch::new(&fx.dir);
    let mut server = Server::start(
        &fx.snap,
        &fx.dir.join("s.sock"),
        &[
            "--overlay",
            ov.to_str().unwrap(),
            "--send-timeout",
            "3",
            "--overlay-size",
            "268435456",
        ],
    );
    let pid = server.child.id();
    let mut c = server.connect();
    let root = ROOT_NODE;
    let mut counts = Vec::new();

    // 1. Names that try to leave the tree, in every op that takes a name.
    let long = "x".repeat(256);
    let bad_names: Vec<&[u8]> = vec![
        b"..",
        b".",
        b"",
        b"a/b",
        b"../canary.txt",
        b"../../../../etc/passwd",
        b"/",
        b"/etc/passwd",
        b"canary.txt\0",
        b"a\0b",
        long.as_bytes(),
    ];
    let mut n = 0;
    for name in &bad_names {
        let name = name.to_vec();
        let ops = vec![
            Op::Lookup {
                parent: root,
                name: name.clone(),
            },
            Op::Mkdir {
                parent: root,
                name: name.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Mknod {
                parent: root,
                name: name.clone(),
                mode: libc::S_IFREG | 0o644,
                rdev: 0,
                uid: 0,
                gid: 0,
            },
            Op::Create {
                parent: root,
                name: name.clone(),
                mode: 0o644,
                flags: libc::O_RDWR as u32 | libc::O_CREAT as u32,
                uid: 0,
                gid: 0,
            },
            Op::Symlink {
                parent: root,
                name: name.clone(),
                target: b"README.md".to_vec(),
                uid: 0,
                gid: 0,
            },
            Op::Unlink {
                parent: root,
                name: name.clone(),
            },
            Op::Rmdir {
                parent: root,
                name: name.clone(),
            },
            Op::Rename {
                parent: root,
                name: b"README.md".to_vec(),
                new_parent: root,
                new_name: name.clone(),
                flags: 0,
            },
            Op::Rename {
                parent: root,
                name: name.clone(),
                new_parent: root,
                new_name: b"stolen".to_vec(),
                flags: 0,
            },
            Op::Link {
                node: 2,
                new_parent: root,
                new_name: name.clone(),
            },
        ];
        for op in ops {
            let what = format!("{op:?}");
            let r = call(&mut c, op);
            let want = if name.len() > 255 {
                Errno::ENAMETOOLONG
            } else {
                Errno::EINVAL
            };
            assert_eq!(r, ReplyBody::Err(want), "{what}");
            n += 1;
        }
    }
    // The canary's own name is not in the tree.
    assert_eq!(c.lookup(root, "canary.txt").map(|_| ()), Err(Errno::ENOENT));
    counts.push(("name escapes refused", n + 1));

    // 2. Symlinks: returned as nodes, never followed, whatever they point at.
    let mut n = 0;
    for name in [
        "abs-canary",
        "rel-canary",
        "far-canary",
        "chain1",
        "chain2",
        "chain3",
        "loop-a",
        "loop-b",
        "self",
        "root-link",
        "outside-dir",
    ] {
        let e = c.lookup(root, name).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        match call(&mut c, Op::Readlink { node: e.node }) {
            ReplyBody::Data(t) => assert!(!t.is_empty()),
            other => panic!("readlink {name}: {other:?}"),
        }
        for child in ["canary.txt", "passwd", "x"] {
            assert_eq!(
                c.lookup(e.node, child).map(|_| ()),
                Err(Errno::ENOTDIR),
                "{name}/{child}"
            );
        }
        assert_eq!(c.mkdir(e.node, "x").map(|_| ()), Err(Errno::ENOTDIR));
        assert!(is_err(&call(
            &mut c,
            Op::Opendir {
                node: e.node,
                list: None
            }
        )));
        // Opening a symlink node must not open its target; if the server lets it be
        // opened at all, reads give no canary bytes and writes do not reach the canary.
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_RDWR | libc::O_TRUNC] {
            if let ReplyBody::Opened { fh, .. } = call(
                &mut c,
                Op::Open {
                    node: e.node,
                    flags: flags as u32,
                    read: None,
                },
            ) {
                call(
                    &mut c,
                    Op::Read {
                        fh,
                        offset: 0,
                        size: 1 << 16,
                    },
                );
                call(
                    &mut c,
                    Op::Write {
                        fh,
                        offset: 0,
                        data: b"pwned".to_vec(),
                    },
                );
                call(&mut c, Op::Release { fh });
            }
        }
        call(
            &mut c,
            Op::Setattr {
                node: e.node,
                fh: None,
                mode: Some(0o777),
                uid: None,
                gid: None,
                size: Some(0),
                atime: Some(SetTime::Now),
                mtime: Some(SetTime::Now),
            },
        );
        call(
            &mut c,
            Op::Setxattr {
                node: e.node,
                name: b"user.x".to_vec(),
                value: b"y".to_vec(),
                flags: 0,
            },
        );
        call(
            &mut c,
            Op::Create {
                parent: e.node,
                name: b"new".to_vec(),
                mode: 0o644,
                flags: libc::O_RDWR as u32,
                uid: 0,
                gid: 0,
            },
        );
        call(
            &mut c,
            Op::Rename {
                parent: root,
                name: b"README.md".to_vec(),
                new_parent: e.node,
                new_name: b"moved".to_vec(),
                flags: 0,
            },
        );
        n += 1;
    }
    // A guest-made symlink to the canary, then the same treatment.
    let s = c
        .entry(Op::Symlink {
            parent: root,
            name: b"guest-link".to_vec(),
            target: fx.canary.as_os_str().as_bytes().to_vec(),
            uid: 0,
            gid: 0,
        })
        .unwrap();
    assert_eq!(c.lookup(s.node, "x").map(|_| ()), Err(Errno::ENOTDIR));
    if let Ok(fh) = c.open(s.node, libc::O_RDWR) {
        call(
            &mut c,
            Op::Read {
                fh,
                offset: 0,
                size: 4096,
            },
        );
        call(
            &mut c,
            Op::Write {
                fh,
                offset: 0,
                data: b"pwned".to_vec(),
            },
        );
    }
    counts.push(("symlinks probed (never followed)", n + 1));

    // 3. Forged and stale node ids and handles.
    let mut n = 0;
    let forged_nodes = [
        0u64,
        1 << 32,
        (1 << 32) + 1,
        1 << 40,
        1 << 63,
        u64::MAX,
        10_000,
    ];
    for node in forged_nodes {
        for op in [
            Op::Getattr { node, fh: None },
            Op::Open {
                node,
                flags: 0,
                read: None,
            },
            Op::Opendir { node, list: None },
            Op::Readlink { node },
            Op::Statfs { node },
            Op::Listxattr { node },
            Op::Lookup {
                parent: node,
                name: b"README.md".to_vec(),
            },
            Op::Mkdir {
                parent: node,
                name: b"m".to_vec(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Link {
                node,
                new_parent: root,
                new_name: b"l".to_vec(),
            },
            Op::Setattr {
                node,
                fh: None,
                mode: Some(0o600),
                uid: None,
                gid: None,
                size: Some(1),
                atime: None,
                mtime: None,
            },
        ] {
            let what = format!("{op:?}");
            let r = call(&mut c, op);
            // Statfs describes the file system, whatever node it names.
            if !matches!(r, ReplyBody::Statfs(_)) {
                assert!(is_err(&r), "forged node: {what} -> {r:?}");
            }
            n += 1;
        }
        // Forget of an unknown node: ok, and nothing changes.
        call(&mut c, Op::Forget { node, nlookup: 1 });
    }
    let dir_fh = c.opendir(root).unwrap();
    let readme = c.walk("README.md").unwrap().node;
    let file_fh = c.open(readme, libc::O_RDONLY).unwrap();
    for fh in [
        0u64,
        1,
        u64::MAX,
        1 << 63,
        dir_fh ^ 1,
        file_fh.wrapping_add(1),
    ] {
        for op in [
            Op::Read {
                fh,
                offset: 0,
                size: 10,
            },
            Op::Write {
                fh,
                offset: 0,
                data: b"x".to_vec(),
            },
            Op::Fsync {
                fh,
                datasync: false,
            },
            Op::Readdir {
                fh,
                cookie: 0,
                max_entries: 10,
            },
            Op::Release { fh },
            Op::Releasedir { fh },
            Op::Lseek {
                fh,
                offset: 0,
                whence: 3,
            },
        ] {
            let what = format!("{op:?}");
            let r = call(&mut c, op);
            if fh != file_fh && fh != dir_fh {
                assert_eq!(r, ReplyBody::Err(Errno::EBADF), "{what}");
            }
            n += 1;
        }
    }
    // Handles of the wrong kind (Linux answers EISDIR/ENOTDIR here; EBADF is fine too).
    let r = call(
        &mut c,
        Op::Read {
            fh: dir_fh,
            offset: 0,
            size: 10,
        },
    );
    assert!(
        matches!(
            r,
            ReplyBody::Err(Errno::EBADF) | ReplyBody::Err(Errno::EISDIR)
        ),
        "{r:?}"
    );
    let r = call(
        &mut c,
        Op::Readdir {
            fh: file_fh,
            cookie: 0,
            max_entries: 10,
        },
    );
    assert!(
        matches!(
            r,
            ReplyBody::Err(Errno::EBADF) | ReplyBody::Err(Errno::ENOTDIR)
        ),
        "{r:?}"
    );
    // A released handle is stale at once.
    c.ok(Op::Release { fh: file_fh }).unwrap();
    assert_eq!(
        call(
            &mut c,
            Op::Read {
                fh: file_fh,
                offset: 0,
                size: 10
            }
        ),
        ReplyBody::Err(Errno::EBADF)
    );
    assert_eq!(
        call(&mut c, Op::Release { fh: file_fh }),
        ReplyBody::Err(Errno::EBADF)
    );
    c.ok(Op::Releasedir { fh: dir_fh }).unwrap();
    counts.push(("forged/stale ids and handles", n + 4));

    // 4. Requests after forget: an unlinked file lives while referenced, then is stale.
    let (e, fh) = c
        .create(root, "doomed", 0o644, libc::O_RDWR)
        .expect("create");
    c.write(fh, 0, b"doomed bytes").unwrap();
    c.ok(Op::Unlink {
        parent: root,
        name: b"doomed".to_vec(),
    })
    .unwrap();
    assert_eq!(c.read(fh, 0, 100).unwrap(), b"doomed bytes");
    c.ok(Op::Release { fh }).unwrap();
    // Over-forgetting (more than was looked up, u64::MAX) is harmless.
    c.ok(Op::Forget {
        node: e.node,
        nlookup: u64::MAX,
    })
    .unwrap();
    c.ok(Op::Forget {
        node: e.node,
        nlookup: u64::MAX,
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.getattr(e.node) {
            Err(Errno::ESTALE) | Err(Errno::ENOENT) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "a forgotten unlinked node still answers: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(is_err(&call(
        &mut c,
        Op::Open {
            node: e.node,
            flags: 0,
            read: None
        }
    )));
    assert!(is_err(&call(
        &mut c,
        Op::Link {
            node: e.node,
            new_parent: root,
            new_name: b"resurrected".to_vec(),
        }
    )));
    // Forgetting the root, or a snapshot node, many times: both keep working.
    for _ in 0..10 {
        for _ in 0..100 {
            c.send(Op::Forget {
                node: root,
                nlookup: u64::MAX,
            });
            c.send(Op::Forget {
                node: readme,
                nlookup: u64::MAX,
            });
        }
        for _ in 0..200 {
            assert_eq!(c.recv().r, ReplyBody::ok());
        }
    }
    assert_eq!(c.read_path("README.md").unwrap(), b"# hostile\n");
    counts.push(("requests after forget", 2005));

    // 5. Absurd sizes and offsets on a file of our own.
    let (big, fh) = c.create(root, "absurd", 0o644, libc::O_RDWR).unwrap();
    let big = big.node;
    let mut n = 0;
    for off in [1u64 << 62, 1 << 63, u64::MAX - 1, u64::MAX] {
        let r = call(
            &mut c,
            Op::Read {
                fh,
                offset: off,
                size: 4096,
            },
        );
        println!("  read 4 KiB at {off}: {r:?}");
        match r {
            ReplyBody::Data(d) => assert!(d.is_empty(), "read past the end at {off} gave bytes"),
            ReplyBody::Err(_) => {}
            other => panic!("{other:?}"),
        }
        n += 1;
    }
    for off in [(1u64 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX - 4096] {
        let r = call(
            &mut c,
            Op::Write {
                fh,
                offset: off,
                data: vec![1; 8192],
            },
        );
        println!("  write 8 KiB at {off}: {r:?}");
        assert!(is_err(&r), "write at {off}: {r:?}");
        n += 1;
    }
    for size in [1u64 << 62, (1 << 63) - 1, u64::MAX] {
        let r = call(
            &mut c,
            Op::Setattr {
                node: big,
                fh: None,
                mode: None,
                uid: None,
                gid: None,
                size: Some(size),
                atime: None,
                mtime: None,
            },
        );
        println!(
            "  setattr size {size}: {}",
            match &r {
                ReplyBody::Attr { attr, .. } => format!("ok, size {}", attr.size),
                other => format!("{other:?}"),
            }
        );
        if let ReplyBody::Attr { attr, .. } = &r {
            assert_eq!(attr.size, size);
            // A huge sparse file costs nothing; reading its end gives zeros.
            match call(
                &mut c,
                Op::Read {
                    fh,
                    offset: size - 10,
                    size: 100,
                },
            ) {
                ReplyBody::Data(d) => assert_eq!(d, vec![0; 10]),
                ReplyBody::Err(_) => {}
                other => panic!("{other:?}"),
            }
        }
        n += 1;
    }
    for (offset, length, mode) in [
        (0u64, 1u64 << 62, 0u32),
        (0, u64::MAX, 0),
        (u64::MAX, 1, 0),
        (1 << 62, 1 << 62, 1),
        (0, u64::MAX, 3),
        (u64::MAX - 1, u64::MAX, 3),
        (0, 0, 0),
        (0, 1, 0xffff_ffff),
    ] {
        let r = call(
            &mut c,
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            },
        );
        println!("  fallocate {offset}+{length} mode {mode:#x}: {r:?}");
        if offset > 1 << 40 || length > 1 << 40 {
            assert!(is_err(&r), "fallocate {offset}+{length} mode {mode}: {r:?}");
        }
        n += 1;
    }
    for whence in [0u32, 1, 2, 3, 4, 5, u32::MAX] {
        for offset in [0, u64::MAX] {
            call(&mut c, Op::Lseek { fh, offset, whence });
            n += 1;
        }
    }
    for (size, max_entries) in [(u32::MAX, 0u32), (0, u32::MAX), (64 << 20, 5000)] {
        assert!(
            is_err(&call(
                &mut c,
                Op::Read {
                    fh,
                    offset: 0,
                    size
                }
            )) || size == 0
        );
        let d = c.opendir(root).unwrap();
        assert!(is_err(&call(
            &mut c,
            Op::Readdir {
                fh: d,
                cookie: u64::MAX,
                max_entries
            }
        )));
        c.ok(Op::Releasedir { fh: d }).unwrap();
        n += 2;
    }
    assert!(is_err(&call(
        &mut c,
        Op::BatchForget {
            items: vec![(root, 1); 5000]
        }
    )));
    assert!(is_err(&call(
        &mut c,
        Op::Setxattr {
            node: big,
            name: vec![b'u'; 300],
            value: vec![],
            flags: 0
        }
    )));
    assert!(is_err(&call(
        &mut c,
        Op::Setxattr {
            node: big,
            name: b"user.big".to_vec(),
            value: vec![0; 70_000],
            flags: 0
        }
    )));
    c.ok(Op::Release { fh }).unwrap();
    // All that left no huge file in the overlay.
    let on_disk: u64 = fs::read_dir(ov.join("data"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(on_disk < 64 << 20, "overlay data uses {on_disk} bytes");
    counts.push(("absurd sizes/offsets", n + 3));

    // 6. Bad frames and deep nesting, each on its own connection.
    let mut n = 0;
    // Oversized, zero-length and truncated frames.
    for (bytes, truncated) in [
        (vec![0xff, 0xff, 0xff, 0xff], false),
        (vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3], false),
        (vec![0, 0, 0, 0], false),
        (vec![0, 0x20, 0, 0], false),
        (vec![0, 0, 0, 100, 0xa2, 0x62], true),
    ] {
        let mut s = raw_session(&server.socket);
        let _ = s.write_all(&bytes);
        if truncated {
            // The server waits for the rest of the frame; we hang up mid-frame instead.
            drop(s);
        } else {
            assert!(read_reply(&mut s).is_none(), "{bytes:?} was answered");
        }
        n += 1;
    }
    // Deep CBOR nesting: a whole body of nested arrays, and nesting inside a request
    // whose id is readable.
    for depth in [300usize, 10_000, 1_000_000] {
        let mut body = vec![0x81u8; depth];
        body.push(0);
        let mut s = raw_session(&server.socket);
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        let _ = s.write_all(&f);
        assert!(read_reply(&mut s).is_none());
        // {"id": 9, "op": {"lookup": [[[...]]]}}
        let mut body = vec![0xa2, 0x62, b'i', b'd', 0x09, 0x62, b'o', b'p', 0xa1, 0x66];
        body.extend_from_slice(b"lookup");
        body.extend_from_slice(&vec![0x81u8; depth.min(900_000)]);
        body.push(0);
        let mut s = raw_session(&server.socket);
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        let _ = s.write_all(&f);
        if let Some(r) = read_reply(&mut s) {
            assert_eq!(r.id, 9);
            assert!(is_err(&r.r));
        }
        // Indefinite-length nesting too.
        let mut body = vec![0x9fu8; depth.min(900_000)];
        body.push(0);
        let mut s = raw_session(&server.socket);
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        let _ = s.write_all(&f);
        assert!(read_reply(&mut s).is_none());
        n += 3;
    }
    // A claimed huge CBOR byte string inside a small frame.
    let body = [
        0xa2, 0x62, b'i', b'd', 0x0a, 0x62, b'o', b'p', 0xa1, 0x66, b'l', b'o', b'o', b'k', b'u',
        b'p', 0xa2, 0x66, b'p', b'a', b'r', b'e', b'n', b't', 0x01, 0x64, b'n', b'a', b'm', b'e',
        0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    let mut s = raw_session(&server.socket);
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    let _ = s.write_all(&f);
    if let Some(r) = read_reply(&mut s) {
        assert!(is_err(&r.r));
    }
    n += 1;
    assert!(server.is_running(), "the server died on bad frames");
    counts.push(("bad frames / deep nesting", n));

    // 7. Handle flood on one connection (opens and opendirs): EMFILE, server alive.
    let mut h = server.connect();
    let mut emfile = 0;
    let mut granted = 0;
    let mut pending = 0;
    for i in 0..17_000u64 {
        if i % 2 == 0 {
            h.send(Op::Open {
                node: readme,
                flags: 0,
                read: None,
            });
        } else {
            h.send(Op::Opendir {
                node: root,
                list: None,
            });
        }
        pending += 1;
        if pending == 200 {
            for _ in 0..pending {
                match h.recv().r {
                    ReplyBody::Opened { .. } => granted += 1,
                    ReplyBody::Err(Errno::EMFILE) => emfile += 1,
                    other => panic!("{other:?}"),
                }
            }
            pending = 0;
        }
    }
    for _ in 0..pending {
        match h.recv().r {
            ReplyBody::Opened { .. } => granted += 1,
            ReplyBody::Err(Errno::EMFILE) => emfile += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(granted, 16_384);
    assert_eq!(emfile, 17_000 - 16_384);
    drop(h);
    counts.push(("handle flood: opens (EMFILE after 16384)", 17_000));

    // 8. Reference flood: the same node looked up millions of times, never forgotten.
    let lookups: u64 = std::env::var("HEXZ_HOSTILE_LOOKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250_000);
    let rss_before = status_kib(pid, "VmRSS:");
    let mut r = server.connect();
    let sub = r.walk("sub").unwrap().node;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut got = 0u64;
    let window = 200;
    let mut rss_peak_flood = 0;
    let mut next_sample = 100_000;
    while got < lookups {
        while sent < lookups && sent - got < window {
            let name: &[u8] = match sent % 4 {
                0 => b"a.txt",
                1 => b"deeper",
                2 => b"missing",
                _ => b"a.txt",
            };
            r.send(Op::Lookup {
                parent: sub,
                name: name.to_vec(),
            });
            sent += 1;
        }
        match r.recv().r {
            ReplyBody::Entry(_) | ReplyBody::Err(Errno::ENOENT) => {}
            other => panic!("{other:?}"),
        }
        got += 1;
        if got >= next_sample {
            next_sample += 100_000;
            rss_peak_flood = rss_peak_flood.max(status_kib(pid, "VmRSS:"));
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let rss_after = status_kib(pid, "VmRSS:");
    // The counts saturate instead of overflowing: one forget of u64::MAX ends them.
    r.ok(Op::Forget {
        node: sub,
        nlookup: u64::MAX,
    })
    .unwrap();
    assert_eq!(r.read_path("sub/a.txt").unwrap(), pseudo_random(70_000, 1));
    drop(r);
    println!(
        "reference flood: {lookups} lookups in {flood_secs:.1} s; VmRSS {rss_before} KiB before, \
         {rss_peak_flood} KiB peak during, {rss_after} KiB after"
    );
    assert!(
        rss_after < rss_before + (32 << 10),
        "RSS grew by {} KiB over {lookups} lookups of the same nodes",
        rss_after.saturating_sub(rss_before)
    );
    counts.push(("reference flood: lookups", lookups as usize));

    // 9. 1,000 connections at once: the cap (256) holds, the server stays up, and a new
    // client is served once they are gone.
    raise_nofile(4096);
    let mut conns = Vec::new();
    for _ in 0..1000 {
        match UnixStream::connect(&server.socket) {
            Ok(mut s) => {
                let _ = s.write_all(&hello_frame());
                conns.push(s);
            }
            Err(_) => break,
        }
    }
    let mut answered = 0;
    for s in conns.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Some(Reply {
            r: ReplyBody::Hello(_),
            ..
        }) = read_reply(s)
        {
            answered += 1;
        }
    }
    println!(
        "1,000 connections: {} connected, {answered} said hello (cap 256, incl. ours)",
        conns.len()
    );
    assert!(
        answered <= 256,
        "{answered} connections served past the cap"
    );
    assert!(server.is_running());
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fresh = loop {
        let s = UnixStream::connect(&server.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match client::Client::new(s, default_hello()) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no new client served: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(matches!(
        fresh.call(Op::Getattr {
            node: root,
            fh: None
        }),
        Ok(ReplyBody::Attr { .. })
    ));
    counts.push(("connections opened at once", 1000));

    // 10. A client that never reads: it stalls only itself and is cut off.
    let mut stalled = raw_session(&server.socket);
    let a = c.walk("sub/a.txt").unwrap().node;
    stalled
        .write_all(&frame_of(&Request {
            id: 2,
            op: Op::Open {
                node: a,
                flags: 0,
                read: None,
            },
        }))
        .unwrap();
    let sfh = match read_reply(&mut stalled).map(|r| r.r) {
        Some(ReplyBody::Opened { fh, .. }) => fh,
        other => panic!("{other:?}"),
    };
    stalled
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut stalled_sent = 0;
    for id in 10..100_000u64 {
        let req = frame_of(&Request {
            id,
            op: Op::Read {
                fh: sfh,
                offset: 0,
                size: 65_536,
            },
        });
        if stalled.write_all(&req).is_err() {
            break;
        }
        stalled_sent += 1;
    }
    // Meanwhile others are served.
    let started = Instant::now();
    assert_eq!(c.read_path("sub/a.txt").unwrap(), pseudo_random(70_000, 1));
    println!(
        "never-reading client: {stalled_sent} requests accepted before the server stopped \
         reading it; another client read a file {:.0} ms later",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut cut = false;
    while Instant::now() < deadline {
        let req = frame_of(&Request {
            id: 1_000_000,
            op: Op::Getattr {
                node: root,
                fh: None,
            },
        });
        if stalled.write_all(&req).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "a client that never reads was not disconnected");
    counts.push(("never-reading client", 1));

    // Everything above: the server is alive, the canary untouched, nothing new beside it.
    assert!(server.is_running(), "the server crashed");
    let mut last = server.connect();
    assert_eq!(last.read_path("README.md").unwrap(), b"# hostile\n");
    let hwm = status_kib(pid, "VmHWM:");
    server.stop();
    assert_eq!(fs::read(&fx.canary).unwrap(), canary_bytes);
    let m = fs::metadata(&fx.canary).unwrap();
    assert_eq!(
        (
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino()
        ),
        (
            canary_meta.mtime(),
            canary_meta.mtime_nsec(),
            canary_meta.ctime(),
            canary_meta.ctime_nsec(),
            canary_meta.ino()
        )
    );
    let events = watch.events();
    let canary_events: Vec<_> = events.iter().filter(|(n, _)| n == "canary.txt").collect();
    // The one open allowed is this test's own read just above; the server must add none.
    let opens = canary_events
        .iter()
        .filter(|(_, m)| m & libc::IN_OPEN != 0)
        .count();
    assert!(
        canary_events
            .iter()
            .all(|(_, m)| m & (libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_CLOSE_WRITE) == 0),
        "the canary was changed: {canary_events:?}"
    );
    assert_eq!(
        opens, 1,
        "the canary was opened by someone besides this test: {canary_events:?}"
    );
    let after: BTreeSet<_> = fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.iter()
            .all(|n| n.as_bytes() == b"ov" || n.as_bytes() == b"s.sock"),
        "files appeared beside the snapshot: {new:?}"
    );
    let created: BTreeSet<_> = events
        .iter()
        .filter(|(_, m)| m & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0)
        .map(|(n, _)| n.clone())
        .collect();
    assert!(
        created.iter().all(|n| n == "ov" || n == "s.sock"),
        "created beside the snapshot: {created:?}"
    );

    let total: usize = counts.iter().map(|(_, n)| n).sum();
    for (what, n) in &counts {
        println!("  {what}: {n}");
    }
    println!(
        "hostile requests: {total}; escapes 0; crashes 0; server peak RSS (VmHWM) {hwm} KiB \
         (bound asserted: {RSS_BOUND_KIB} KiB)"
    );
    assert!(hwm < RSS_BOUND_KIB, "peak RSS {hwm} KiB");
}

fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
