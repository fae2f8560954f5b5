//! A real `hexz-host serve` over a Unix socket, driven by a protocol client: every
//! opcode and its errors, copy-on-write over the snapshot, concurrency, disconnect
//! cleanup, hostile input, kill -9 durability and restart stability.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    src: PathBuf,
    snap: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let src = dir.join("src");
        fs::create_dir_all(src.join("dir/nested")).unwrap();
        fs::write(src.join("README.md"), b"# hello\n").unwrap();
        fs::write(src.join("big.bin"), pseudo_random(3_000_000, 1)).unwrap();
        let f = fs::File::create(src.join("sparse.img")).unwrap();
        f.write_all_at(&pseudo_random(200_000, 2), 1 << 20).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        fs::write(src.join("dir/nested/deep.txt"), b"deep\n").unwrap();
        fs::write(src.join("dir/a"), b"linked\n").unwrap();
        fs::hard_link(src.join("dir/a"), src.join("a2")).unwrap();
        std::os::unix::fs::symlink("README.md", src.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc", src.join("escape")).unwrap();
        fs::create_dir(src.join("emptydir")).unwrap();
        let snap = dir.join("ws.hxz");
        let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
        assert_eq!(r.status, 0, "{}", r.stderr);
        Fixture {
            _tmp: tmp,
            dir,
            src,
            snap,
        }
    }

    fn server(&self, name: &str, extra: &[&str]) -> Server {
        Server::start(&self.snap, &self.dir.join(format!("{name}.sock")), extra)
    }

    fn overlay(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

const O_RDWR: i32 = libc::O_RDWR;

#[test]
fn snapshot_contents_read_back_exactly_through_the_protocol() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = server.connect();
    assert_eq!(c.hello.version, 1);
    assert_eq!(c.hello.root, ROOT_NODE);
    assert!(c.hello.caps.contains(&"readdirplus".to_string()));

    for (path, file) in [
        ("README.md", "README.md"),
        ("big.bin", "big.bin"),
        ("dir/nested/deep.txt", "dir/nested/deep.txt"),
    ] {
        let e = c.walk(path).unwrap();
        assert_eq!(
            c.read_all(e.node).unwrap(),
            fs::read(fx.src.join(file)).unwrap(),
            "{path}"
        );
    }
    let sparse = c.walk("sparse.img").unwrap();
    assert_eq!(sparse.attr.size, 64 << 20);
    // st_blocks counts stored bytes: the 200 KB of data, not the 64 MiB of holes.
    let stored = sparse.attr.blocks * 512;
    assert!(
        (200_000..1 << 20).contains(&stored),
        "sparse.img reports {stored} bytes allocated"
    );
    assert!(c.walk("big.bin").unwrap().attr.blocks * 512 >= 3_000_000);
    let fh = c.open(sparse.node, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(fh, 0, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(
        c.read(fh, 1 << 20, 100).unwrap(),
        pseudo_random(200_000, 2)[..100].to_vec()
    );
    match c.call(Op::Lseek {
        fh,
        offset: 0,
        whence: message::SEEK_DATA,
    }) {
        ReplyBody::Offset { offset } => assert_eq!(offset, 1 << 20),
        other => panic!("{other:?}"),
    }
    match c.call(Op::Lseek {
        fh,
        offset: 1 << 20,
        whence: message::SEEK_HOLE,
    }) {
        ReplyBody::Offset { offset } => assert!(
            ((1 << 20) + 200_000..=2 << 20).contains(&offset),
            "{offset}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call(Op::Lseek {
            fh,
            offset: 64 << 20,
            whence: message::SEEK_DATA
        }),
        ReplyBody::Err(Errno::ENXIO)
    );

    // Hard links: one node, nlink 2, same inode under both names.
    let a = c.walk("dir/a").unwrap();
    let a2 = c.walk("a2").unwrap();
    assert_eq!(a.node, a2.node);
    assert_eq!(a.attr.nlink, 2);
    assert_eq!(a.attr.ino, a.node);

    // Symlinks are nodes; nothing is followed on the client's behalf.
    for (name, target) in [
        ("link", "README.md"),
        ("evil", "/etc/passwd"),
        ("escape", "../../../../../../etc"),
    ] {
        let e = c.walk(name).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_eq!(
            c.call(Op::Readlink { node: e.node }),
            ReplyBody::Data(target.as_bytes().to_vec())
        );
        assert_eq!(
            c.lookup(e.node, "passwd"),
            Err(Errno::ENOTDIR),
            "lookup through symlink {name}"
        );
    }

    // Listings, plain and plus, paged by cookie.
    let mut want: Vec<String> = fs::read_dir(&fx.src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.extend([".".to_string(), "..".to_string()]);
    want.sort();
    for plus in [false, true] {
        let mut got: Vec<String> = c
            .list(ROOT_NODE, plus)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        got.sort();
        assert_eq!(got, want, "plus={plus}");
    }

    // Metadata matches the source.
    let readme = c.walk("README.md").unwrap();
    let m = fs::symlink_metadata(fx.src.join("README.md")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(readme.attr.mode, m.mode());
    assert_eq!(
        (readme.attr.mtime.0, readme.attr.mtime.1),
        (m.mtime(), m.mtime_nsec() as u32)
    );
    assert_eq!(readme.attr.uid, m.uid());
    match c.call(Op::Statfs { node: ROOT_NODE }) {
        ReplyBody::Statfs(s) => assert!(s.blocks > 0 && s.namelen == 255),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_change_lands_in_the_overlay_with_local_filesystem_semantics() {
    let fx = Fixture::new();
    let snap_before = fs::read(&fx.snap).unwrap();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let root = ROOT_NODE;

    // create / O_EXCL / O_TRUNC / O_APPEND
    let (f, fh) = c
        .create(
            root,
            "new.txt",
            0o640,
            O_RDWR | libc::O_CREAT | libc::O_EXCL,
        )
        .unwrap();
    assert_eq!(f.attr.mode, libc::S_IFREG | 0o640);
    assert_eq!(c.write(fh, 0, b"hello world").unwrap(), 11);
    assert_eq!(
        c.create(
            root,
            "new.txt",
            0o640,
            O_RDWR | libc::O_CREAT | libc::O_EXCL
        ),
        Err(Errno::EEXIST)
    );
    let (_, fh2) = c
        .create(root, "new.txt", 0o640, O_RDWR | libc::O_CREAT)
        .unwrap();
    assert_eq!(c.read(fh2, 0, 100).unwrap(), b"hello world");
    let fh3 = c.open(f.node, O_RDWR | libc::O_APPEND).unwrap();
    c.write(fh3, 0, b"!").unwrap();
    assert_eq!(c.read_all(f.node).unwrap(), b"hello world!");
    let fh4 = c.open(f.node, O_RDWR | libc::O_TRUNC).unwrap();
    assert_eq!(c.getattr(f.node).unwrap().size, 0);
    for h in [fh, fh2, fh3, fh4] {
        c.ok(Op::Release { fh: h }).unwrap();
    }

    // copy-on-write into a snapshot file: 4 KiB in the middle of big.bin
    let big = c.walk("big.bin").unwrap();
    let fh = c.open(big.node, O_RDWR).unwrap();
    c.write(fh, 1_000_001, &[0xEE; 4096]).unwrap();
    c.ok(Op::Fsync {
        fh,
        datasync: false,
    })
    .unwrap();
    c.ok(Op::Release { fh }).unwrap();
    let mut want = pseudo_random(3_000_000, 1);
    want[1_000_001..1_004_097].fill(0xEE);
    assert!(
        c.read_all(big.node).unwrap() == want,
        "merged read of a patched snapshot file"
    );
    let upper = fs::metadata(fx.dir.join("ov/data").join(format!("{:016x}", big.node))).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        upper.blocks() * 512 <= 64 << 10,
        "a 4 KiB patch allocated {} bytes in the upper file",
        upper.blocks() * 512
    );

    // truncate down and up: the cut part reads as zeros, not as the old snapshot bytes
    let a = c.walk("dir/a").unwrap();
    c.call(Op::Setattr {
        node: a.node,
        fh: None,
        mode: None,
        uid: None,
        gid: None,
        size: Some(3),
        atime: None,
        mtime: None,
    });
    c.call(Op::Setattr {
        node: a.node,
        fh: None,
        mode: None,
        uid: None,
        gid: None,
        size: Some(10),
        atime: None,
        mtime: None,
    });
    assert_eq!(c.read_all(a.node).unwrap(), b"lin\0\0\0\0\0\0\0");
    assert_eq!(
        c.read_path("a2").unwrap(),
        b"lin\0\0\0\0\0\0\0",
        "hard link sees the change"
    );

    // chmod / chown / times
    let r = c.call(Op::Setattr {
        node: a.node,
        fh: None,
        mode: Some(0o4711),
        uid: Some(1234),
        gid: Some(99),
        size: None,
        atime: Some(SetTime::At(Timespec(1000, 5))),
        mtime: Some(SetTime::At(Timespec(2000, 7))),
    });
    let ReplyBody::Attr { attr, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (attr.mode, attr.uid, attr.gid),
        (libc::S_IFREG | 0o4711, 1234, 99)
    );
    assert_eq!(
        (attr.atime, attr.mtime),
        (Timespec(1000, 5), Timespec(2000, 7))
    );

    // mkdir / rmdir / ENOTEMPTY / nlink of parents
    let root_links = c.getattr(root).unwrap().nlink;
    let d = c.mkdir(root, "d").unwrap();
    assert_eq!(d.attr.nlink, 2);
    assert_eq!(c.getattr(root).unwrap().nlink, root_links + 1);
    c.mkdir(d.node, "sub").unwrap();
    assert_eq!(c.getattr(d.node).unwrap().nlink, 3);
    assert_eq!(
        c.ok(Op::Rmdir {
            parent: root,
            name: b"d".to_vec()
        }),
        Err(Errno::ENOTEMPTY)
    );
    assert_eq!(
        c.ok(Op::Rmdir {
            parent: root,
            name: b"README.md".to_vec()
        }),
        Err(Errno::ENOTDIR)
    );
    assert_eq!(
        c.ok(Op::Unlink {
            parent: root,
            name: b"d".to_vec()
        }),
        Err(Errno::EISDIR)
    );
    c.ok(Op::Rmdir {
        parent: d.node,
        name: b"sub".to_vec(),
    })
    .unwrap();
    c.ok(Op::Rmdir {
        parent: root,
        name: b"d".to_vec(),
    })
    .unwrap();
    assert_eq!(c.getattr(root).unwrap().nlink, root_links);
    assert_eq!(
        c.ok(Op::Rmdir {
            parent: root,
            name: b"emptydir".to_vec()
        }),
        Ok(())
    );

    // rename: over a file, NOREPLACE, EXCHANGE, dir into itself, over a non-empty dir
    let (x, fx1) = c.create(root, "x", 0o644, O_RDWR | libc::O_CREAT).unwrap();
    c.write(fx1, 0, b"X").unwrap();
    c.ok(Op::Release { fh: fx1 }).unwrap();
    let ren = |parent, name: &str, new_parent, new_name: &str, flags| Op::Rename {
        parent,
        name: name.as_bytes().to_vec(),
        new_parent,
        new_name: new_name.as_bytes().to_vec(),
        flags,
    };
    assert_eq!(
        c.ok(ren(root, "x", root, "README.md", message::RENAME_NOREPLACE)),
        Err(Errno::EEXIST)
    );
    c.ok(ren(root, "x", root, "README.md", 0)).unwrap();
    let readme = c.walk("README.md").unwrap();
    assert_eq!(readme.node, x.node, "renamed file keeps its node id");
    assert_eq!(c.read_all(readme.node).unwrap(), b"X");
    assert_eq!(c.lookup(root, "x"), Err(Errno::ENOENT));
    c.ok(ren(
        root,
        "README.md",
        root,
        "big.bin",
        message::RENAME_EXCHANGE,
    ))
    .unwrap();
    assert_eq!(c.read_path("big.bin").unwrap(), b"X");
    assert_eq!(c.read_path("README.md").unwrap().len(), 3_000_000);
    let dir = c.walk("dir").unwrap();
    let nested = c.walk("dir/nested").unwrap();
    assert_eq!(
        c.ok(ren(root, "dir", nested.node, "loop", 0)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        c.ok(ren(root, "README.md", root, "dir", 0)),
        Err(Errno::EISDIR)
    );
    let e2 = c.mkdir(root, "e2").unwrap();
    assert_eq!(c.ok(ren(root, "e2", root, "dir", 0)), Err(Errno::ENOTEMPTY));
    c.ok(ren(dir.node, "nested", e2.node, "moved", 0)).unwrap();
    assert_eq!(
        c.walk("e2/moved/deep.txt").map(|e| e.node),
        c.lookup(nested.node, "deep.txt").map(|e| e.node)
    );
    assert_eq!(
        c.ok(ren(root, "nope", root, "x", message::RENAME_EXCHANGE)),
        Err(Errno::ENOENT)
    );
    assert_eq!(c.ok(ren(root, "a2", root, "a2b", 4)), Err(Errno::EINVAL));

    // link / unlink of an open file
    let l = c
        .entry(Op::Link {
            node: f.node,
            new_parent: root,
            new_name: b"new-link".to_vec(),
        })
        .unwrap();
    assert_eq!(l.attr.nlink, 2);
    assert_eq!(
        c.entry(Op::Link {
            node: dir.node,
            new_parent: root,
            new_name: b"dl".to_vec()
        }),
        Err(Errno::EPERM)
    );
    let (g, gfh) = c
        .create(root, "ghost", 0o600, O_RDWR | libc::O_CREAT)
        .unwrap();
    c.write(gfh, 0, b"still here").unwrap();
    c.ok(Op::Unlink {
        parent: root,
        name: b"ghost".to_vec(),
    })
    .unwrap();
    assert_eq!(c.lookup(root, "ghost"), Err(Errno::ENOENT));
    assert_eq!(c.read(gfh, 0, 100).unwrap(), b"still here");
    c.write(gfh, 10, b"!").unwrap();
    assert_eq!(c.getattr(g.node).unwrap().nlink, 0);
    c.ok(Op::Release { fh: gfh }).unwrap();
    // Still referenced by this client's lookup (create) until it forgets the node.
    assert_eq!(c.getattr(g.node).unwrap().nlink, 0);
    let ghost_data = fx.dir.join("ov/data").join(format!("{:016x}", g.node));
    assert!(ghost_data.exists());
    c.ok(Op::Forget {
        node: g.node,
        nlookup: 1,
    })
    .unwrap();
    assert_eq!(c.getattr(g.node), Err(Errno::ESTALE));
    assert!(!ghost_data.exists(), "unlinked file's data was not removed");

    // symlink / mknod / xattrs
    let s = c
        .entry(Op::Symlink {
            parent: root,
            name: b"sl".to_vec(),
            target: b"/nowhere".to_vec(),
            uid: 0,
            gid: 0,
        })
        .unwrap();
    assert_eq!(s.attr.mode, libc::S_IFLNK | 0o777);
    assert_eq!(s.attr.size, 8);
    let fifo = c
        .entry(Op::Mknod {
            parent: root,
            name: b"p".to_vec(),
            mode: libc::S_IFIFO | 0o600,
            rdev: 0,
            uid: 0,
            gid: 0,
        })
        .unwrap();
    assert_eq!(fifo.attr.mode, libc::S_IFIFO | 0o600);
    let xa = |node, name: &str, value: &[u8], flags| Op::Setxattr {
        node,
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
        flags,
    };
    c.ok(xa(f.node, "user.k", b"v1", message::XATTR_CREATE))
        .unwrap();
    assert_eq!(
        c.ok(xa(f.node, "user.k", b"v2", message::XATTR_CREATE)),
        Err(Errno::EEXIST)
    );
    assert_eq!(
        c.ok(xa(f.node, "user.nope", b"v", message::XATTR_REPLACE)),
        Err(Errno::ENODATA)
    );
    c.ok(xa(f.node, "user.k", b"v2", message::XATTR_REPLACE))
        .unwrap();
    assert_eq!(
        c.call(Op::Getxattr {
            node: f.node,
            name: b"user.k".to_vec()
        }),
        ReplyBody::Data(b"v2".to_vec())
    );
    assert_eq!(
        c.ok(xa(f.node, "user.big", &vec![0; 70_000], 0)),
        Err(Errno::E2BIG)
    );
    match c.call(Op::Listxattr { node: f.node }) {
        ReplyBody::Names { names } => assert_eq!(names.len(), 1),
        other => panic!("{other:?}"),
    }
    c.ok(Op::Removexattr {
        node: f.node,
        name: b"user.k".to_vec(),
    })
    .unwrap();
    assert_eq!(
        c.call(Op::Getxattr {
            node: f.node,
            name: b"user.k".to_vec()
        }),
        ReplyBody::Err(Errno::ENODATA)
    );

    // fallocate and holes in new files
    let (h, hfh) = c
        .create(root, "holey", 0o644, O_RDWR | libc::O_CREAT)
        .unwrap();
    c.write(hfh, 1 << 20, b"end").unwrap();
    c.ok(Op::Fallocate {
        fh: hfh,
        offset: 0,
        length: 4 << 20,
        mode: 0,
    })
    .unwrap();
    assert_eq!(c.getattr(h.node).unwrap().size, 4 << 20);
    c.ok(Op::Fallocate {
        fh: hfh,
        offset: 1 << 20,
        length: 2,
        mode: 3,
    })
    .unwrap();
    assert_eq!(c.read(hfh, 1 << 20, 3).unwrap(), b"\0\0d");
    assert_eq!(
        c.ok(Op::Fallocate {
            fh: hfh,
            offset: 0,
            length: 1,
            mode: 0x10
        }),
        Err(Errno::EOPNOTSUPP)
    );
    c.ok(Op::Fsync {
        fh: hfh,
        datasync: true,
    })
    .unwrap();
    c.ok(Op::Release { fh: hfh }).unwrap();

    // directory fsync
    let dfh = c.opendir(root).unwrap();
    c.ok(Op::Fsyncdir {
        fh: dfh,
        datasync: false,
    })
    .unwrap();
    c.ok(Op::Releasedir { fh: dfh }).unwrap();

    drop(c);
    drop(server);
    assert!(
        fs::read(&fx.snap).unwrap() == snap_before,
        "the snapshot file changed"
    );
}

#[test]
fn errors_are_specific_errnos_never_a_catch_all() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = server.connect();
    let root = ROOT_NODE;
    assert_eq!(c.lookup(root, "missing"), Err(Errno::ENOENT));
    let readme = c.walk("README.md").unwrap();
    assert_eq!(c.lookup(readme.node, "x"), Err(Errno::ENOTDIR));
    assert_eq!(c.lookup(root, &"n".repeat(256)), Err(Errno::ENAMETOOLONG));
    assert_eq!(c.getattr(987_654_321), Err(Errno::ESTALE));
    assert_eq!(c.read(424_242, 0, 10), Err(Errno::EBADF));
    let dir = c.walk("dir").unwrap().node;
    assert_eq!(c.open(dir, O_RDWR), Err(Errno::EISDIR));
    assert_eq!(
        c.call(Op::Readlink { node: readme.node }),
        ReplyBody::Err(Errno::EINVAL)
    );
    let fh = c.open(readme.node, libc::O_RDONLY).unwrap();
    assert_eq!(
        c.write(fh, 0, b"x"),
        Err(Errno::EBADF),
        "write on a read-only handle"
    );
    assert_eq!(
        c.read(fh, 0, 64 << 20),
        Err(Errno::EINVAL),
        "read above max_read"
    );
    assert_eq!(
        c.call(Op::Readdir {
            fh,
            cookie: 0,
            max_entries: 10
        }),
        ReplyBody::Err(Errno::ENOTDIR)
    );
    assert_eq!(c.mkdir(root, "README.md"), Err(Errno::EEXIST));
    assert_eq!(
        c.call(Op::Hello(default_hello())),
        ReplyBody::Err(Errno::EPROTO)
    );
}

#[test]
fn read_only_mode_refuses_writes_and_creates_nothing() {
    let fx = Fixture::new();
    let before: Vec<_> = fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let server = fx.server("ro", &["--read-only"]);
    let mut c = server.connect();
    assert_eq!(c.mkdir(ROOT_NODE, "x"), Err(Errno::EROFS));
    assert_eq!(
        c.create(ROOT_NODE, "y", 0o644, O_RDWR | libc::O_CREAT)
            .map(|_| ()),
        Err(Errno::EROFS)
    );
    let readme = c.walk("README.md").unwrap();
    assert_eq!(c.open(readme.node, O_RDWR), Err(Errno::EROFS));
    assert_eq!(c.read_all(readme.node).unwrap(), b"# hello\n");
    let after: Vec<_> = fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "ro.sock")
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "read-only serve created files: {after:?}"
    );
}

#[test]
fn many_requests_in_flight_are_all_answered_and_one_connection_never_blocks_another() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = server.connect();
    let big = c.walk("big.bin").unwrap();
    let fh = c.open(big.node, libc::O_RDONLY).unwrap();
    let want = pseudo_random(3_000_000, 1);
    let mut expected = std::collections::HashMap::new();
    for i in 0..200u64 {
        let id = if i % 2 == 0 {
            let off = (i * 12_345) % 2_900_000;
            let id = c.send(Op::Read {
                fh,
                offset: off,
                size: 65_536,
            });
            expected.insert(id, Some(off));
            id
        } else {
            let id = c.send(Op::Lookup {
                parent: ROOT_NODE,
                name: b"README.md".to_vec(),
            });
            expected.insert(id, None);
            id
        };
        let _ = id;
    }
    let mut other = server.connect();
    assert!(
        other.walk("dir/nested/deep.txt").is_ok(),
        "second connection is served while the first is busy"
    );
    for _ in 0..200 {
        let r = c.recv();
        match (
            expected.remove(&r.id).expect("unknown or duplicate id"),
            r.r,
        ) {
            (Some(off), ReplyBody::Data(d)) => assert!(
                d == want[off as usize..off as usize + 65_536],
                "read at {off}"
            ),
            (None, ReplyBody::Entry(e)) => assert_eq!(e.attr.size, 8),
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(expected.is_empty());
}

#[test]
fn a_closed_connection_releases_its_handles_and_unlinked_files() {
    let fx = Fixture::new();
    // Nameless nodes wait --orphan-grace for their client to come back and retain them.
    let server = fx.server(
        "s",
        &["--overlay", &fx.overlay("ov"), "--orphan-grace", "1"],
    );
    let data = fx.dir.join("ov/data");
    {
        let mut c = server.connect();
        for i in 0..50 {
            let (_, fh) = c
                .create(ROOT_NODE, &format!("t{i}"), 0o644, O_RDWR | libc::O_CREAT)
                .unwrap();
            c.write(fh, 0, b"temporary").unwrap();
            c.ok(Op::Unlink {
                parent: ROOT_NODE,
                name: format!("t{i}").into_bytes(),
            })
            .unwrap();
        }
        assert_eq!(
            fs::read_dir(&data).unwrap().count(),
            50,
            "open unlinked files keep their data"
        );
    }
    // The server notices the close and releases: poll for a bounded time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fs::read_dir(&data).unwrap().count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        fs::read_dir(&data).unwrap().count(),
        0,
        "handles of a closed connection were not released"
    );
}

#[test]
fn hostile_input_gets_errors_or_a_closed_connection_never_a_crash_or_an_escape() {
    let fx = Fixture::new();
    let mut server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let root = ROOT_NODE;
    for name in ["..", ".", "", "a/b", "../../etc/passwd", "a\0b", "/etc"] {
        assert_eq!(c.lookup(root, name), Err(Errno::EINVAL), "lookup {name:?}");
        assert_eq!(
            c.mkdir(root, name).map(|_| ()),
            Err(Errno::EINVAL),
            "mkdir {name:?}"
        );
    }
    assert_eq!(
        c.mkdir(root, &"x".repeat(256)).map(|_| ()),
        Err(Errno::ENAMETOOLONG)
    );
    // A symlink the guest makes is stored, never followed by the host.
    let s = c
        .entry(Op::Symlink {
            parent: root,
            name: b"out".to_vec(),
            target: b"/etc".to_vec(),
            uid: 0,
            gid: 0,
        })
        .unwrap();
    assert_eq!(c.lookup(s.node, "passwd"), Err(Errno::ENOTDIR));
    assert_eq!(c.mkdir(s.node, "x").map(|_| ()), Err(Errno::ENOTDIR));
    assert!(c
        .entry(Op::Symlink {
            parent: root,
            name: b"nul".to_vec(),
            target: b"a\0b".to_vec(),
            uid: 0,
            gid: 0
        })
        .is_err());
    // Nothing outside the overlay was created.
    assert!(!Path::new("/etc/x").exists());

    // Unknown opcode: ENOSYS with the id. Bad field types: EINVAL with the id.
    let mut body = Vec::new();
    ciborium_value_request(&mut body, 77, "frobnicate");
    let mut s1 = raw(&server.socket, &hello_frame());
    read_reply(&mut s1);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    std::io::Write::write_all(&mut s1, &frame).unwrap();
    let r = read_reply(&mut s1).expect("reply to unknown opcode");
    assert_eq!((r.id, r.r), (77, ReplyBody::Err(Errno::ENOSYS)));

    // Oversized frame: the connection is closed, the server lives on.
    let mut s2 = raw(&server.socket, &hello_frame());
    read_reply(&mut s2);
    std::io::Write::write_all(&mut s2, &[0xff, 0xff, 0xff, 0xf0, 1, 2, 3]).unwrap();
    assert!(
        read_reply(&mut s2).is_none(),
        "oversized frame answered instead of closing"
    );
    // Garbage before hello, a request before hello, a huge hello.
    let mut s3 = raw(&server.socket, &[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    assert!(read_reply(&mut s3).is_none());
    let mut s4 = raw(
        &server.socket,
        &frame_of(&Request {
            id: 5,
            op: Op::Statfs { node: 1 },
        }),
    );
    assert_eq!(
        read_reply(&mut s4).map(|r| r.r),
        Some(ReplyBody::Err(Errno::EPROTO))
    );
    assert!(
        read_reply(&mut s4).is_none(),
        "connection stays open after a request before hello"
    );
    let mut s5 = raw(&server.socket, &[0x00, 0x10, 0x00, 0x00]);
    assert!(
        read_reply(&mut s5).is_none(),
        "pre-hello frame over 64 KiB accepted"
    );
    // Version nobody speaks.
    let mut h = default_hello();
    h.versions = vec![99];
    let mut s6 = raw(
        &server.socket,
        &frame_of(&Request {
            id: 1,
            op: Op::Hello(h),
        }),
    );
    assert_eq!(
        read_reply(&mut s6).map(|r| r.r),
        Some(ReplyBody::Err(Errno::EPROTONOSUPPORT))
    );

    // Handle flood: the per-connection limit answers EMFILE, and closing frees them all.
    let readme = c.walk("README.md").unwrap();
    let mut emfile = false;
    let mut batch = 0;
    for _ in 0..17_000 {
        c.send(Op::Open {
            node: readme.node,
            flags: 0,
            read: None,
        });
        batch += 1;
        if batch == 200 {
            for _ in 0..batch {
                if c.recv().r == ReplyBody::Err(Errno::EMFILE) {
                    emfile = true;
                }
            }
            batch = 0;
        }
    }
    for _ in 0..batch {
        if c.recv().r == ReplyBody::Err(Errno::EMFILE) {
            emfile = true;
        }
    }
    assert!(
        emfile,
        "17000 open handles on one connection were all granted"
    );
    drop(c);
    let mut c2 = server.connect();
    assert!(
        c2.open(readme.node, 0).is_ok(),
        "server still serves after the flood"
    );
    assert!(server.is_running(), "server died");
}

fn frame_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, 1 << 20, &mut out).unwrap();
    out
}

fn hello_frame() -> Vec<u8> {
    frame_of(&Request {
        id: 1,
        op: Op::Hello(default_hello()),
    })
}

fn read_reply(s: &mut std::os::unix::net::UnixStream) -> Option<Reply> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    decode_reply(&body).ok()
}

fn ciborium_value_request(out: &mut Vec<u8>, id: u64, op: &str) {
    // {"id": id, "op": {op: {}}} by hand, so the test does not depend on the encoder.
    out.push(0xa2);
    out.extend_from_slice(&[0x62, b'i', b'd']);
    out.push(0x18);
    out.push(id as u8);
    out.extend_from_slice(&[0x62, b'o', b'p', 0xa1]);
    out.push(0x60 + op.len() as u8);
    out.extend_from_slice(op.as_bytes());
    out.push(0xa0);
}

#[test]
fn fsynced_data_survives_kill_9_every_time() {
    let fx = Fixture::new();
    let ov = fx.overlay("ov");
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..12u64 {
        let mut server = fx.server("s", &["--overlay", &ov]);
        let mut c = server.connect();
        // Everything fsynced in earlier rounds is there, byte for byte.
        for (name, data) in &written {
            let e = c
                .walk(name)
                .unwrap_or_else(|e| panic!("round {round}: {name} lost: {e}"));
            check_synced(
                &c.read_all(e.node).unwrap(),
                data,
                &format!("round {round}: {name}"),
            );
        }
        let dir = match c.walk("work") {
            Ok(e) => e.node,
            Err(_) => c.mkdir(ROOT_NODE, "work").unwrap().node,
        };
        let name = format!("f{round}");
        let data = pseudo_random(10_000 + round as usize * 7_777, round + 10);
        let (_, fh) = c.create(dir, &name, 0o644, O_RDWR | libc::O_CREAT).unwrap();
        c.write(fh, 0, &data).unwrap();
        // Also patch a snapshot file (copy-on-write path).
        let big = c.walk("big.bin").unwrap();
        let bfh = c.open(big.node, O_RDWR).unwrap();
        c.write(bfh, round * 100_003, &[round as u8; 5000]).unwrap();
        c.ok(Op::Fsync {
            fh: bfh,
            datasync: false,
        })
        .unwrap();
        c.ok(Op::Fsync {
            fh,
            datasync: false,
        })
        .unwrap();
        let dfh = c.opendir(dir).unwrap();
        c.ok(Op::Fsyncdir {
            fh: dfh,
            datasync: false,
        })
        .unwrap();
        // Unsynced work in flight when the server dies.
        c.send(Op::Write {
            fh,
            offset: data.len() as u64,
            data: vec![1; 100_000],
        });
        c.send(Op::Mkdir {
            parent: dir,
            name: format!("unsynced{round}").into_bytes(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        });
        server.kill9();
        written.push((format!("work/{name}"), data));
        let mut big_want = if round == 0 {
            pseudo_random(3_000_000, 1)
        } else {
            written_big(&written)
        };
        let off = (round * 100_003) as usize;
        big_want[off..off + 5000].fill(round as u8);
        set_big(&mut written, big_want);
    }
    let mut server = fx.server("s", &["--overlay", &ov]);
    let mut c = server.connect();
    for (name, data) in &written {
        let e = c.walk(name).unwrap();
        check_synced(
            &c.read_all(e.node).unwrap(),
            data,
            &format!("final: {name}"),
        );
    }
    server.stop();
}

/// The fsynced bytes are exact; anything after them can only be the unsynced write of 1s
/// that was in flight when the server was killed (it may or may not have landed).
fn check_synced(got: &[u8], synced: &[u8], what: &str) {
    assert!(
        got.len() >= synced.len(),
        "{what}: {} bytes, {} were fsynced",
        got.len(),
        synced.len()
    );
    assert!(
        &got[..synced.len()] == synced,
        "{what}: fsynced bytes differ"
    );
    assert!(
        got[synced.len()..].iter().all(|&b| b == 1),
        "{what}: bytes after the fsynced part are not the unsynced write"
    );
}

fn written_big(w: &[(String, Vec<u8>)]) -> Vec<u8> {
    w.iter()
        .find(|(n, _)| n == "big.bin")
        .map(|(_, d)| d.clone())
        .unwrap_or_else(|| pseudo_random(3_000_000, 1))
}

fn set_big(w: &mut Vec<(String, Vec<u8>)>, data: Vec<u8>) {
    w.retain(|(n, _)| n != "big.bin");
    w.push(("big.bin".into(), data));
}

#[test]
fn node_ids_are_the_same_after_a_restart_on_the_same_overlay() {
    let fx = Fixture::new();
    let ov = fx.overlay("ov");
    let (ids, fs_id) = {
        let mut server = fx.server("s", &["--overlay", &ov]);
        let mut c = server.connect();
        let d = c.mkdir(ROOT_NODE, "made").unwrap();
        let (f, fh) = c
            .create(d.node, "file", 0o644, O_RDWR | libc::O_CREAT)
            .unwrap();
        c.write(fh, 0, b"x").unwrap();
        c.ok(Op::Release { fh }).unwrap();
        c.ok(Op::Rename {
            parent: ROOT_NODE,
            name: b"README.md".to_vec(),
            new_parent: d.node,
            new_name: b"moved.md".to_vec(),
            flags: 0,
        })
        .unwrap();
        let ids: Vec<u64> = [
            "big.bin",
            "made",
            "made/file",
            "made/moved.md",
            "dir/nested/deep.txt",
        ]
        .iter()
        .map(|p| c.walk(p).unwrap().node)
        .collect();
        assert_eq!(ids[2], f.node);
        let fs_id = c.hello.fs_id.clone();
        assert!(server.stop().success(), "clean shutdown");
        (ids, fs_id)
    };
    let server = fx.server("s", &["--overlay", &ov]);
    let mut c = server.connect();
    assert_eq!(c.hello.fs_id, fs_id, "fs_id changed across a restart");
    let again: Vec<u64> = [
        "big.bin",
        "made",
        "made/file",
        "made/moved.md",
        "dir/nested/deep.txt",
    ]
    .iter()
    .map(|p| c.walk(p).unwrap().node)
    .collect();
    assert_eq!(ids, again);
    // A reconnecting client uses its old ids without any lookup.
    for id in &ids {
        assert!(c.getattr(*id).is_ok(), "node {id} unknown after restart");
    }
    assert_eq!(c.read_all(ids[3]).unwrap(), b"# hello\n");
    // A different overlay is a different filesystem.
    drop(c);
    drop(server);
    let other = fx.server("s2", &["--overlay", &fx.overlay("ov2")]);
    assert_ne!(other.connect().hello.fs_id, fs_id);
}

#[test]
fn an_overlay_refuses_a_different_snapshot_and_a_second_server() {
    let fx = Fixture::new();
    let ov = fx.overlay("ov");
    let _server = fx.server("s", &["--overlay", &ov]);
    let r = hexz_host(&[
        &"serve",
        &fx.snap,
        &"--overlay",
        &ov,
        &"--listen",
        &format!("unix:{}/t.sock", fx.dir.display()),
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    let other = fx.dir.join("other.hxz");
    fs::write(fx.dir.join("src/extra"), b"different").unwrap();
    assert_eq!(hexz_host(&[&"pack", &fx.src, &"-o", &other]).status, 0);
    drop(_server);
    let r = hexz_host(&[
        &"serve",
        &other,
        &"--overlay",
        &ov,
        &"--listen",
        &format!("unix:{}/t.sock", fx.dir.display()),
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("belongs to snapshot"), "{}", r.stderr);
}

#[test]
fn unix_hybrid_vsock_and_loopback_tcp_listeners_serve_at_once_and_an_ephemeral_overlay_leaves_nothing(
) {
    use std::process::Command;
    let fx = Fixture::new();
    let tmp = fx.dir.join("tmp");
    fs::create_dir(&tmp).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uds = fx.dir.join("vm.vsock");
    let unix = fx.dir.join("plain.sock");
    let mut child = Command::new(hexz_e2e::bin("hexz-host"))
        .arg("serve")
        .arg(&fx.snap)
        .args(["--listen", &format!("unix:{}", unix.display())])
        .args(["--listen", &format!("vsock-uds:{}", uds.display())])
        .args(["--listen", &format!("tcp:127.0.0.1:{port}")])
        .env("TMPDIR", &tmp)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hybrid = PathBuf::from(format!("{}_5001", uds.display()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(hybrid.exists() && unix.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The hybrid-vsock convention: a guest's connection to port 5001 lands on <uds>_5001.
    let mut via_uds = client::Client::new(
        std::os::unix::net::UnixStream::connect(&hybrid).unwrap(),
        default_hello(),
    )
    .unwrap();
    let mut via_tcp = {
        let mut tries = 0;
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break client::Client::new(s, default_hello()).unwrap(),
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("tcp: {e}"),
            }
        }
    };
    let mut via_unix = Client::connect(&unix);
    let op = || Op::Create {
        parent: ROOT_NODE,
        name: b"made.txt".to_vec(),
        mode: 0o644,
        flags: (O_RDWR | libc::O_CREAT) as u32,
        uid: 0,
        gid: 0,
    };
    let ReplyBody::Created { fh, .. } = via_uds.call(op()).unwrap() else {
        panic!("create over hybrid vsock")
    };
    assert!(matches!(
        via_uds
            .call(Op::Write {
                fh,
                offset: 0,
                data: b"via uds".to_vec()
            })
            .unwrap(),
        ReplyBody::Written { size: 7, .. }
    ));
    let node = via_unix.walk("made.txt").unwrap().node;
    assert_eq!(
        via_unix.read_all(node).unwrap(),
        b"via uds",
        "all listeners serve one filesystem"
    );
    match via_tcp
        .call(Op::Lookup {
            parent: ROOT_NODE,
            name: b"made.txt".to_vec(),
        })
        .unwrap()
    {
        ReplyBody::Entry(e) => assert_eq!(e.node, node),
        other => panic!("tcp lookup: {other:?}"),
    }
    let overlays = || {
        fs::read_dir(&tmp)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("hexz-overlay")
            })
            .count()
    };
    assert_eq!(
        overlays(),
        1,
        "the ephemeral overlay lives in TMPDIR while serving"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert_eq!(overlays(), 0, "the ephemeral overlay outlived the server");
    assert!(
        !hybrid.exists() && !unix.exists(),
        "socket files left behind"
    );
}

#[test]
fn open_reads_opendir_lists_and_write_returns_attributes_in_one_round_trip() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let readme = c.walk("README.md").unwrap();
    // open + the first read.
    let got = c.call(Op::Open {
        node: readme.node,
        flags: 0,
        read: Some(ReadAt {
            offset: 2,
            size: 100,
        }),
    });
    let ReplyBody::Opened { data: Some(d), .. } = got else {
        panic!("open with read: {got:?}");
    };
    assert_eq!(d.as_ref(), b"hello\n");
    // A read that cannot be done (write-only handle) leaves the data out, not the open.
    let got = c.call(Op::Open {
        node: readme.node,
        flags: libc::O_WRONLY as u32,
        read: Some(ReadAt { offset: 0, size: 8 }),
    });
    assert!(
        matches!(got, ReplyBody::Opened { data: None, .. }),
        "{got:?}"
    );
    // opendir + the first page, with references like readdirplus.
    let dir = c.walk("dir").unwrap();
    let got = c.call(Op::Opendir {
        node: dir.node,
        list: Some(100),
    });
    let ReplyBody::Opened {
        list: Some(l), fh, ..
    } = got
    else {
        panic!("opendir with list: {got:?}");
    };
    let names: Vec<_> = l.entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, [&b"."[..], b"..", b"a", b"nested"]);
    assert!(l.eof);
    let same = c.call(Op::Readdirplus {
        fh,
        cookie: 0,
        max_entries: 100,
    });
    let ReplyBody::DirPlus { entries, .. } = same else {
        panic!("{same:?}");
    };
    assert_eq!(entries.len(), l.entries.len());
    // write → the attributes after it.
    let (_, fh) = c
        .create(ROOT_NODE, "w.txt", 0o644, O_RDWR | libc::O_CREAT)
        .unwrap();
    let got = c.call(Op::Write {
        fh,
        offset: 10,
        data: b"abc".to_vec(),
    });
    let ReplyBody::Written {
        size: 3,
        attr: Some(a),
        attr_ttl_ms: Some(_),
    } = got
    else {
        panic!("write: {got:?}");
    };
    assert_eq!(a.size, 13);
    let now = c.walk("w.txt").unwrap().attr;
    assert_eq!((a.size, a.mtime, a.ctime), (now.size, now.mtime, now.ctime));
}

#[test]
fn read_files_returns_whole_small_files_in_order_and_bounds_its_reply() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    assert!(c.hello.caps.contains(&"read_files".to_string()));
    let readme = c.walk("README.md").unwrap().node;
    let deep = c.walk("dir/nested/deep.txt").unwrap().node;
    let big = c.walk("big.bin").unwrap().node;
    let link = c.walk("link").unwrap().node;
    let dir = c.walk("dir").unwrap().node;
    // An overlay file, changed after it was created: its bytes as they are now.
    let (e, fh) = c.create(ROOT_NODE, "new.txt", 0o644, O_RDWR).unwrap();
    c.write(fh, 0, b"first version, longer").unwrap();
    c.write(fh, 0, b"SECOND").unwrap();
    let files = |c: &mut Client, nodes: Vec<u64>, max_size: u32| match c
        .call(Op::ReadFiles { nodes, max_size })
    {
        ReplyBody::Files { files } => files
            .into_iter()
            .map(|f| (f.node, f.data.into_vec()))
            .collect::<Vec<_>>(),
        other => panic!("expected files, got {other:?}"),
    };
    // In the order asked; a directory, a symlink, a file above max_size and a node that
    // does not exist are left out.
    let got = files(
        &mut c,
        vec![deep, dir, link, big, 999_999, e.node, readme],
        65_536,
    );
    assert_eq!(
        got,
        vec![
            (deep, b"deep\n".to_vec()),
            (e.node, b"SECONDversion, longer".to_vec()),
            (readme, b"# hello\n".to_vec()),
        ]
    );
    // max_size is inclusive; one byte less leaves README.md (8 bytes) out.
    assert_eq!(files(&mut c, vec![readme], 8).len(), 1);
    assert!(files(&mut c, vec![readme], 7).is_empty());
    // The reply stops before the first file that would not fit in the frame.
    let max_read = c.inner.limits.max_read;
    let big_attr = c.walk("big.bin").unwrap().attr;
    assert!(big_attr.size > c.inner.limits.max_frame as u64);
    let (e2, fh2) = c.create(ROOT_NODE, "half.bin", 0o644, O_RDWR).unwrap();
    let half = pseudo_random(c.inner.limits.max_frame as usize / 2 + 4096, 9);
    c.write(fh2, 0, &half).unwrap();
    let got = files(&mut c, vec![e2.node, e2.node, readme], max_read);
    let shape: Vec<_> = got.iter().map(|(n, d)| (*n, d.len())).collect();
    assert_eq!(
        shape,
        vec![(e2.node, half.len())],
        "the second copy cannot fit"
    );
    assert!(got[0].1 == half, "half.bin read back wrong");
    // Bounds: more than 4096 nodes, or max_size above max_read.
    assert_eq!(
        c.call(Op::ReadFiles {
            nodes: vec![readme; 4097],
            max_size: 1
        }),
        ReplyBody::Err(Errno::EINVAL)
    );
    assert_eq!(
        c.call(Op::ReadFiles {
            nodes: vec![readme],
            max_size: max_read + 1
        }),
        ReplyBody::Err(Errno::EINVAL)
    );
    assert_eq!(files(&mut c, vec![readme; 4096], 16).len(), 4096);
}

/// A connection to `server` whose hello leaves `cap` out.
fn client_without(
    server: &Server,
    cap: &str,
) -> hexz_protocol::client::Client<std::os::unix::net::UnixStream> {
    let mut h = default_hello();
    h.caps.retain(|c| c != cap);
    let stream = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let c = hexz_protocol::client::Client::new(stream, h).unwrap();
    assert!(!c.hello.caps.contains(&cap.to_string()));
    c
}

/// A client that leaves `cap` out of its hello gets ENOSYS for `op`.
fn refused_without_capability(cap: &str, op: Op) {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = client_without(&server, cap);
    assert_eq!(c.call(op).unwrap(), ReplyBody::Err(Errno::ENOSYS));
}

#[test]
fn read_files_needs_its_capability() {
    refused_without_capability(
        "read_files",
        Op::ReadFiles {
            nodes: vec![ROOT_NODE],
            max_size: 1,
        },
    );
}

#[test]
fn list_dirs_returns_whole_listings_with_references_and_bounds_its_reply() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    assert!(c.hello.caps.contains(&"list_dirs".to_string()));
    let dir = c.walk("dir").unwrap().node;
    let nested = c.walk("dir/nested").unwrap().node;
    let empty = c.walk("emptydir").unwrap().node;
    let readme = c.walk("README.md").unwrap().node;
    let made = c.mkdir(ROOT_NODE, "made").unwrap().node;
    for name in ["x", "y", "ghost"] {
        let (e, fh) = c.create(made, name, 0o644, O_RDWR).unwrap();
        c.ok(Op::Release { fh }).unwrap();
        c.ok(Op::Forget {
            node: e.node,
            nlookup: 1,
        })
        .unwrap();
    }
    let list = |c: &mut Client, nodes: Vec<u64>, max_entries: u32| match c
        .call(Op::ListDirs { nodes, max_entries })
    {
        ReplyBody::Listings { dirs } => dirs
            .into_iter()
            .map(|d| (d.node, d.entries))
            .collect::<Vec<_>>(),
        other => panic!("expected listings, got {other:?}"),
    };
    // What opendir + readdirplus from cookie 0 give, in one page.
    let by_handle = |c: &mut Client, node: u64| {
        let ReplyBody::Opened {
            fh, list: Some(l), ..
        } = c.call(Op::Opendir {
            node,
            list: Some(4096),
        })
        else {
            panic!("opendir {node}");
        };
        assert!(l.eof);
        c.ok(Op::Releasedir { fh }).unwrap();
        let refs: Vec<_> = l
            .entries
            .iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.entry.node, 1))
            .collect();
        c.ok(Op::BatchForget { items: refs }).unwrap();
        l.entries
    };
    // In the order asked; a file, a node that does not exist, and a directory longer
    // than max_entries (made: ., .., ghost, x, y) come back without entries.
    let got = list(
        &mut c,
        vec![nested, readme, ROOT_NODE, 999_999, dir, empty, made],
        5,
    );
    let order: Vec<_> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        order,
        vec![nested, readme, ROOT_NODE, 999_999, dir, empty, made]
    );
    let whole: Vec<bool> = got.iter().map(|(_, e)| e.is_some()).collect();
    // The root has 12 entries with . and ..: longer than 5.
    assert_eq!(whole, [true, false, false, false, true, true, true]);
    for (node, entries) in got.into_iter().filter(|(_, e)| e.is_some()) {
        let entries = entries.unwrap();
        assert_eq!(entries, by_handle(&mut c, node), "listing of node {node}");
    }
    let names = |c: &mut Client, node: u64, max: u32| -> Option<Vec<Vec<u8>>> {
        let mut got = list(c, vec![node], max);
        let entries = got.pop().unwrap().1?;
        Some(entries.into_iter().map(|e| e.name).collect())
    };
    assert_eq!(names(&mut c, made, 4), None, "max_entries counts . and ..");
    let mut want: Vec<Vec<u8>> = vec![b".".to_vec(), b"..".to_vec()];
    assert_eq!(names(&mut c, empty, 2), Some(want.clone()));
    // Each entry but . and .. is a reference: the first listing of `made` holds one on
    // `ghost`, which outlives its name.
    let ghost = c.lookup(made, "ghost").unwrap().node;
    c.ok(Op::Forget {
        node: ghost,
        nlookup: 1,
    })
    .unwrap();
    c.ok(Op::Unlink {
        parent: made,
        name: b"ghost".to_vec(),
    })
    .unwrap();
    want.extend([b"x".to_vec(), b"y".to_vec()]);
    let mut now = names(&mut c, made, 4).unwrap();
    now[2..].sort();
    assert_eq!(now, want, "ghost is gone from the listing");
    assert_eq!(c.getattr(ghost).unwrap().nlink, 0, "held by the listing");
    c.ok(Op::Forget {
        node: ghost,
        nlookup: 1,
    })
    .unwrap();
    assert_eq!(c.getattr(ghost), Err(Errno::ESTALE));
    // The reply stops before the first listing that would not fit in the frame; one that
    // would not fit even alone comes back without entries.
    let wide = c.mkdir(ROOT_NODE, "wide").unwrap().node;
    let add = |c: &mut Client, range: std::ops::Range<u32>| {
        for i in range {
            let (e, fh) = c.create(wide, &format!("f{i:04}"), 0o644, O_RDWR).unwrap();
            c.ok(Op::Release { fh }).unwrap();
            c.ok(Op::Forget {
                node: e.node,
                nlookup: 1,
            })
            .unwrap();
        }
    };
    add(&mut c, 0..2000);
    let got = list(&mut c, vec![wide, wide, dir], 4096);
    assert_eq!(got.len(), 1, "two listings of 2,002 entries fit one frame");
    assert_eq!(got[0].1.as_ref().map(Vec::len), Some(2002));
    let got = list(&mut c, vec![dir, wide], 4096);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(_, e)| e.is_some()));
    add(&mut c, 2000..3600);
    let got = list(&mut c, vec![wide, dir], 4096);
    assert_eq!(got.len(), 2);
    assert!(got[0].1.is_none(), "3,602 entries cannot fit one frame");
    assert!(got[1].1.is_some());
    // Bounds: more than 256 nodes, max_entries 0 or above 4096.
    for (nodes, max_entries) in [(vec![dir; 257], 8), (vec![dir], 0), (vec![dir], 4097)] {
        assert_eq!(
            c.call(Op::ListDirs { nodes, max_entries }),
            ReplyBody::Err(Errno::EINVAL)
        );
    }
    assert_eq!(list(&mut c, vec![empty; 256], 2).len(), 256);
}

#[test]
fn list_dirs_needs_its_capability() {
    refused_without_capability(
        "list_dirs",
        Op::ListDirs {
            nodes: vec![ROOT_NODE],
            max_entries: 8,
        },
    );
}

#[test]
fn write_behind_batches_run_in_order_at_the_clients_time_with_reserved_ids() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    assert!(c.hello.caps.contains(&"write_behind".to_string()));
    let (first, count) = match c.call(Op::Reserve { count: 4 }) {
        ReplyBody::Reserved { first, count } => (first, count),
        other => panic!("expected reserved, got {other:?}"),
    };
    assert_eq!(count, 4);
    let create_as = |name: &str, node: u64, data: &[u8]| Op::CreateAs {
        parent: ROOT_NODE,
        name: name.as_bytes().to_vec(),
        mode: 0o640,
        flags: O_RDWR as u32,
        uid: 1000,
        gid: 1000,
        node,
        data: ByteBuf::from(data.to_vec()),
    };
    let at = |s: i64| Timespec(s, 123);
    let ops = vec![
        Timed {
            at: at(1_000),
            op: create_as("a", first, b"hello"),
        },
        Timed {
            at: at(2_000),
            op: create_as("b", first + 1, b""),
        },
        // An id this connection did not reserve; a name that exists (the id is used up).
        Timed {
            at: at(3_000),
            op: create_as("c", first + 100, b""),
        },
        Timed {
            at: at(4_000),
            op: create_as("README.md", first + 2, b""),
        },
        // Not allowed in a batch: not executed.
        Timed {
            at: at(5_000),
            op: Op::Lookup {
                parent: ROOT_NODE,
                name: b"a".to_vec(),
            },
        },
        // In order: b exists by now.
        Timed {
            at: at(6_000),
            op: Op::Unlink {
                parent: ROOT_NODE,
                name: b"b".to_vec(),
            },
        },
    ];
    let replies = match c.call(Op::Batch { ops }) {
        ReplyBody::Batch { replies } => replies,
        other => panic!("expected batch, got {other:?}"),
    };
    assert_eq!(replies.len(), 6, "{replies:?}");
    let ReplyBody::Created { entry, fh } = &replies[0] else {
        panic!("create_as a: {:?}", replies[0]);
    };
    assert_eq!(entry.node, first);
    assert_eq!(entry.attr.ino, first);
    assert_eq!(entry.attr.size, 5);
    assert_eq!(entry.attr.mode, libc::S_IFREG | 0o640);
    assert_eq!((entry.attr.uid, entry.attr.gid), (1000, 1000));
    assert_eq!(
        (entry.attr.atime, entry.attr.mtime, entry.attr.ctime),
        (at(1_000), at(1_000), at(1_000)),
        "the client's time, also for the write of its data"
    );
    assert_eq!(c.read(*fh, 0, 100).unwrap(), b"hello");
    assert!(matches!(replies[1], ReplyBody::Created { .. }));
    assert_eq!(replies[2], ReplyBody::Err(Errno::EINVAL));
    assert_eq!(replies[3], ReplyBody::Err(Errno::EEXIST));
    assert_eq!(replies[4], ReplyBody::Err(Errno::EINVAL));
    assert!(
        matches!(replies[5], ReplyBody::Ok { .. }),
        "{:?}",
        replies[5]
    );
    assert_eq!(c.lookup(ROOT_NODE, "b").unwrap_err(), Errno::ENOENT);
    assert_eq!(c.lookup(ROOT_NODE, "c").unwrap_err(), Errno::ENOENT);
    let root = c.getattr(ROOT_NODE).unwrap();
    assert_eq!((root.mtime, root.ctime), (at(6_000), at(6_000)));
    assert_eq!(c.walk("a").unwrap().node, first);
    // A reserved id is good for one create only (README.md's failure used first + 2).
    let again = |c: &mut Client, node: u64| {
        c.call(Op::CreateAs {
            parent: ROOT_NODE,
            name: b"again".to_vec(),
            mode: 0o600,
            flags: O_RDWR as u32,
            uid: 0,
            gid: 0,
            node,
            data: ByteBuf::new(),
        })
    };
    assert_eq!(again(&mut c, first), ReplyBody::Err(Errno::EINVAL));
    assert_eq!(again(&mut c, first + 2), ReplyBody::Err(Errno::EINVAL));
    assert!(matches!(
        again(&mut c, first + 3),
        ReplyBody::Created { .. }
    ));
    // Another connection cannot use this one's ids, and gets its own.
    let mut other = server.connect();
    let ReplyBody::Reserved { first: theirs, .. } = other.call(Op::Reserve { count: 1 }) else {
        panic!("reserve on a second connection");
    };
    assert!(theirs >= first + 4, "ids are never handed out twice");
    // Bounds.
    assert_eq!(
        c.call(Op::Reserve { count: 0 }),
        ReplyBody::Err(Errno::EINVAL)
    );
    assert_eq!(
        c.call(Op::Reserve { count: 1025 }),
        ReplyBody::Err(Errno::EINVAL)
    );
    for _ in 0..4 {
        assert!(matches!(
            c.call(Op::Reserve { count: 1024 }),
            ReplyBody::Reserved { .. }
        ));
    }
    assert_eq!(
        c.call(Op::Reserve { count: 1 }),
        ReplyBody::Err(Errno::EAGAIN),
        "at most 4096 unused ids per connection"
    );
    let too_many = (0..257)
        .map(|i| Timed {
            at: at(i),
            op: Op::Unlink {
                parent: ROOT_NODE,
                name: b"nothing".to_vec(),
            },
        })
        .collect();
    assert_eq!(
        c.call(Op::Batch { ops: too_many }),
        ReplyBody::Err(Errno::EINVAL)
    );
    // Without the capability.
    let mut plain = client_without(&server, "write_behind");
    for op in [
        Op::Reserve { count: 1 },
        Op::Batch { ops: vec![] },
        create_as("x", first + 3, b""),
    ] {
        assert_eq!(plain.call(op).unwrap(), ReplyBody::Err(Errno::ENOSYS));
    }
}

#[test]
fn write_behind_is_refused_by_a_read_only_server() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--read-only"]);
    let mut c = server.connect();
    assert_eq!(
        c.call(Op::Reserve { count: 1 }),
        ReplyBody::Err(Errno::EROFS)
    );
}
