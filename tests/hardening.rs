//! The server against a hostile or careless client, and the bounds that protect the
//! others: handles tied to their connection, slow readers, idle connections, duplicate
//! ids, capabilities, nameless nodes across restarts, xattr and overlay size bounds,
//! journal growth, real holes. A real `hexz-host serve` over Unix sockets.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    snap: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let src = dir.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("README.md"), b"# hello\n").unwrap();
        fs::write(src.join("big.bin"), pseudo_random(4 << 20, 7)).unwrap();
        fs::write(src.join("sub/a.txt"), b"a\n").unwrap();
        let snap = dir.join("ws.hxz");
        let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
        assert_eq!(r.status, 0, "{}", r.stderr);
        Fixture {
            _tmp: tmp,
            dir,
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

fn err(r: ReplyBody) -> Errno {
    match r {
        ReplyBody::Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Reads from `s` until the server closes it (or `limit` passes): true when closed.
fn closed_by_server(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Whether the server hung up on `s`, found by writing (reading would unblock a server
/// that is waiting for us to read): keeps sending getattrs until a write fails.
fn hung_up_by_server(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut id = 1_000_000;
    while Instant::now() < deadline {
        id += 1;
        let probe = frame(&Request {
            id,
            op: Op::Getattr {
                node: ROOT_NODE,
                fh: None,
            },
        });
        match s.write_all(&probe) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}

fn frame(req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(req, 1 << 20, &mut out).unwrap();
    out
}

fn hello_bytes(caps: &[&str]) -> Vec<u8> {
    let mut h = default_hello();
    h.caps = caps.iter().map(|c| c.to_string()).collect();
    frame(&Request {
        id: 1,
        op: Op::Hello(h),
    })
}

#[test]
fn handles_belong_to_the_connection_that_opened_them() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut a = server.connect();
    let mut b = server.connect();
    let node = a.walk("README.md").unwrap().node;
    let fh = a.open(node, libc::O_RDWR).unwrap();
    let fh2 = a.open(node, libc::O_RDONLY).unwrap();
    assert_ne!(
        fh2,
        fh + 1,
        "handle numbers must not be a guessable sequence"
    );
    assert_eq!(b.read(fh, 0, 10), Err(Errno::EBADF));
    assert_eq!(b.write(fh, 0, b"x"), Err(Errno::EBADF));
    assert_eq!(b.ok(Op::Release { fh }), Err(Errno::EBADF));
    assert_eq!(
        err(b.call(Op::Getattr { node, fh: Some(fh) })),
        Errno::EBADF
    );
    // Still A's, and still working.
    assert_eq!(a.read(fh, 0, 7).unwrap(), b"# hello");
    a.ok(Op::Release { fh }).unwrap();
}

#[test]
fn wrong_kinds_unknown_nodes_bad_times_and_unnegotiated_caps_are_refused() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = server.connect();
    let file = c.walk("README.md").unwrap().node;
    let fh = c.open(file, libc::O_RDONLY).unwrap();
    let dh = c.opendir(ROOT_NODE).unwrap();
    assert_eq!(c.ok(Op::Release { fh: dh }), Err(Errno::EBADF));
    assert_eq!(c.ok(Op::Releasedir { fh }), Err(Errno::EBADF));
    assert_eq!(c.write(fh, 0, b"x"), Err(Errno::EBADF), "read-only handle");
    assert_eq!(
        err(c.call(Op::Statfs { node: 987_654 })),
        Errno::ESTALE,
        "statfs of an unknown node"
    );
    assert_eq!(
        err(c.call(Op::Getattr {
            node: file,
            fh: Some(0xdead_beef)
        })),
        Errno::EBADF
    );
    assert_eq!(
        err(c.call(Op::Setattr {
            node: file,
            fh: None,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: Some(SetTime::At(Timespec(5, 1_000_000_000))),
        })),
        Errno::EINVAL,
        "nanoseconds past 999,999,999"
    );
    let dir = c.walk("sub").unwrap().node;
    assert_eq!(c.open(dir, libc::O_RDWR), Err(Errno::EISDIR));
    c.ok(Op::Release { fh }).unwrap();
    c.ok(Op::Releasedir { fh: dh }).unwrap();

    // A client that agreed on no capability gets ENOSYS for the ops that need one.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&hello_bytes(&[])).unwrap();
    let mut buf = Vec::new();
    frame::read_frame(&mut s, 1 << 20, &mut buf).unwrap();
    for (id, op) in [
        (
            2,
            Op::Getxattr {
                node: file,
                name: b"user.x".to_vec(),
            },
        ),
        (
            3,
            Op::Readdirplus {
                fh: 1,
                cookie: 0,
                max_entries: 10,
            },
        ),
    ] {
        s.write_all(&frame(&Request { id, op })).unwrap();
        frame::read_frame(&mut s, 1 << 20, &mut buf).unwrap();
        let reply = decode_reply(&buf).unwrap();
        assert_eq!(reply.id, id);
        assert_eq!(reply.r, ReplyBody::Err(Errno::ENOSYS));
    }
}

#[test]
fn a_client_that_never_reads_stalls_only_itself_and_is_disconnected() {
    let fx = Fixture::new();
    let server = fx.server(
        "s",
        &["--send-timeout", "2", "--overlay", &fx.overlay("ov")],
    );
    let mut setup = server.connect();
    let big = setup.walk("big.bin").unwrap().node;
    // The stalled client: asks for 4 MiB again and again and never reads a reply.
    let mut stalled = UnixStream::connect(&server.socket).unwrap();
    stalled.write_all(&hello_bytes(&["readdirplus"])).unwrap();
    let mut buf = Vec::new();
    frame::read_frame(&mut stalled, 1 << 20, &mut buf).unwrap();
    let open = Request {
        id: 2,
        op: Op::Open {
            node: big,
            flags: libc::O_RDONLY as u32,
            read: None,
        },
    };
    stalled.write_all(&frame(&open)).unwrap();
    frame::read_frame(&mut stalled, 1 << 20, &mut buf).unwrap();
    let fh = match decode_reply(&buf).unwrap().r {
        ReplyBody::Opened { fh, .. } => fh,
        other => panic!("{other:?}"),
    };
    stalled
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for id in 10..200u64 {
        let r = Request {
            id,
            op: Op::Read {
                fh,
                offset: 0,
                size: 1 << 20,
            },
        };
        if stalled.write_all(&frame(&r)).is_err() {
            break; // the server stopped reading from us: we are at our in-flight bound
        }
    }
    // Meanwhile another client writes and fsyncs as usual.
    let mut c = server.connect();
    for i in 0..40 {
        let (_, f) = c
            .create(ROOT_NODE, &format!("f{i}"), 0o644, libc::O_RDWR)
            .unwrap();
        c.write(f, 0, &pseudo_random(64 << 10, i)).unwrap();
        c.ok(Op::Fsync {
            fh: f,
            datasync: false,
        })
        .unwrap();
        c.ok(Op::Release { fh: f }).unwrap();
    }
    assert_eq!(c.read_path("f39").unwrap(), pseudo_random(64 << 10, 39));
    // And the stalled client is cut off once its replies waited past --send-timeout.
    assert!(
        hung_up_by_server(&mut stalled, Duration::from_secs(30)),
        "a client that never reads must be disconnected"
    );
}

#[test]
fn connections_are_capped_and_a_silent_one_is_closed_after_the_hello_deadline() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--max-connections", "3", "--hello-timeout", "2"]);
    // Three connections that said hello (so the server surely counts them; the
    // readiness probe of `Server::start` may still hold a slot for a moment)...
    let mut full = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while full.len() < 3 && Instant::now() < deadline {
        let s = UnixStream::connect(&server.socket).unwrap();
        if let Ok(c) = client::Client::new(s, default_hello()) {
            full.push(c);
        }
    }
    assert_eq!(full.len(), 3);
    // ...then a fourth is over the cap: closed at once.
    let mut extra = UnixStream::connect(&server.socket).unwrap();
    let _ = extra.write_all(&hello_bytes(&[]));
    assert!(closed_by_server(&mut extra, Duration::from_secs(10)));
    drop(full);
    // A connection that never says hello is closed after the deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut silent = loop {
        // The three closed connections may take a moment to be noticed.
        let mut s = UnixStream::connect(&server.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) if Instant::now() < deadline => continue,
            _ => break s,
        }
    };
    let started = Instant::now();
    assert!(closed_by_server(&mut silent, Duration::from_secs(10)));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let mut c = server.connect();
    assert_eq!(c.read_path("README.md").unwrap(), b"# hello\n");
}

#[test]
fn reusing_an_id_still_in_flight_closes_the_connection() {
    let fx = Fixture::new();
    let server = fx.server("s", &[]);
    let mut c = server.connect();
    let big = c.walk("big.bin").unwrap().node;
    let fh = c.open(big, libc::O_RDONLY).unwrap();
    drop(c);
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.write_all(&hello_bytes(&[])).unwrap();
    let mut buf = Vec::new();
    frame::read_frame(&mut s, 1 << 20, &mut buf).unwrap();
    // fh belongs to the closed connection: every read is EBADF, but each takes an id.
    let _ = fh;
    // statfs goes to the worker pool, so the reader reads on while it is in flight.
    let same: Vec<u8> = (0..2000)
        .flat_map(|_| {
            frame(&Request {
                id: 77,
                op: Op::Statfs { node: ROOT_NODE },
            })
        })
        .collect();
    let _ = s.write_all(&same);
    assert!(
        closed_by_server(&mut s, Duration::from_secs(20)),
        "2000 requests with one id: some arrive while it is in flight"
    );
    assert!(server.connect().getattr(ROOT_NODE).is_ok());
}

#[test]
fn an_unlinked_open_file_survives_a_reconnect_and_a_restart_when_its_client_retains_it() {
    let fx = Fixture::new();
    let ov = fx.overlay("ov");
    let mut server = fx.server("s", &["--overlay", &ov]);
    let mut c = server.connect();
    let (e, fh) = c.create(ROOT_NODE, "tmp", 0o644, libc::O_RDWR).unwrap();
    c.write(fh, 0, b"still here").unwrap();
    c.ok(Op::Fsync {
        fh,
        datasync: false,
    })
    .unwrap();
    c.ok(Op::Unlink {
        parent: ROOT_NODE,
        name: b"tmp".to_vec(),
    })
    .unwrap();
    // A dropped connection (no restart): the client comes back and retains it.
    drop(c);
    let mut c = server.connect();
    c.ok(Op::Retain {
        items: vec![(e.node, 1)],
    })
    .unwrap();
    assert_eq!(c.read_all(e.node).unwrap(), b"still here");
    server.kill9();
    drop(c);
    let server = fx.server("s", &["--overlay", &ov, "--orphan-grace", "30"]);
    let mut c = server.connect();
    c.ok(Op::Retain {
        items: vec![(e.node, 1)],
    })
    .unwrap();
    assert_eq!(c.read_all(e.node).unwrap(), b"still here");
    drop(server);

    // Not retained: removed once the grace period is over.
    let server = fx.server("s", &["--overlay", &ov, "--orphan-grace", "1"]);
    std::thread::sleep(Duration::from_millis(2500));
    let mut c = server.connect();
    assert_eq!(c.open(e.node, libc::O_RDONLY), Err(Errno::ESTALE));
    assert_eq!(fs::read_dir(fx.dir.join("ov/data")).unwrap().count(), 0);
}

#[test]
fn xattrs_are_bounded_per_node_and_journal_growth_follows_the_change() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let node = c.walk("README.md").unwrap().node;
    let set = |c: &mut Client, name: &[u8], len: usize| {
        c.ok(Op::Setxattr {
            node,
            name: name.to_vec(),
            value: vec![7u8; len],
            flags: 0,
        })
    };
    assert_eq!(set(&mut c, &[b'u'; 256], 1), Err(Errno::ERANGE));
    assert_eq!(set(&mut c, b"user.big", (64 << 10) + 1), Err(Errno::E2BIG));
    for i in 0..3 {
        set(&mut c, format!("user.v{i}").as_bytes(), 64 << 10).unwrap();
    }
    let journal = fx.dir.join("ov/journal");
    let before = fs::metadata(&journal).unwrap().len();
    for s in 0..200 {
        c.call(Op::Setattr {
            node,
            fh: None,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: Some(SetTime::At(Timespec(1_000_000 + s, 0))),
        });
    }
    let grown = fs::metadata(&journal).unwrap().len() - before;
    assert!(
        grown < 200 * 512,
        "200 mtime changes grew the journal by {grown} bytes (xattrs re-journaled?)"
    );
    // 256 KiB of xattrs per node at most: the fourth 64 KiB value does not fit.
    assert_eq!(set(&mut c, b"user.v3", 64 << 10), Err(Errno::ENOSPC));
    // 1024 xattrs per node at most.
    let other = c.walk("sub/a.txt").unwrap().node;
    let mut refused = None;
    for i in 0..1100 {
        let r = c.ok(Op::Setxattr {
            node: other,
            name: format!("user.n{i}").into_bytes(),
            value: b"v".to_vec(),
            flags: 0,
        });
        if r.is_err() {
            refused = Some((i, r));
            break;
        }
    }
    assert_eq!(refused, Some((1024, Err(Errno::ENOSPC))));
}

#[test]
fn the_journal_is_compacted_while_serving_not_only_at_open() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let node = c.walk("README.md").unwrap().node;
    for s in 0..30_016 {
        c.send(Op::Setattr {
            node,
            fh: None,
            mode: Some(0o600 | (s & 0o7)),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        });
        if s % 64 == 63 {
            for _ in 0..64 {
                c.recv();
            }
        }
    }
    let len = fs::metadata(fx.dir.join("ov/journal")).unwrap().len();
    assert!(
        len < 3 << 20,
        "30,000 changes to one node left a {len}-byte journal"
    );
    // Requests in flight may run in any order: a last one decides the mode.
    c.call(Op::Setattr {
        node,
        fh: None,
        mode: Some(0o640),
        uid: None,
        gid: None,
        size: None,
        atime: None,
        mtime: None,
    });
    assert_eq!(c.getattr(node).unwrap().mode & 0o7777, 0o640);
}

#[test]
fn the_overlay_size_limit_gives_enospc_and_keeps_what_was_written() {
    let fx = Fixture::new();
    let ov = fx.overlay("ov");
    let mut server = fx.server("s", &["--overlay", &ov, "--overlay-size", "2M"]);
    let mut c = server.connect();
    let (e, fh) = c.create(ROOT_NODE, "f", 0o644, libc::O_RDWR).unwrap();
    let first = pseudo_random(1 << 20, 3);
    c.write(fh, 0, &first).unwrap();
    let mut refused = false;
    for i in 1..8u64 {
        match c.write(fh, i << 20, &pseudo_random(1 << 20, 4)) {
            Ok(_) => {}
            Err(Errno::ENOSPC) => {
                refused = true;
                break;
            }
            Err(e) => panic!("expected ENOSPC, got {e}"),
        }
    }
    assert!(refused, "8 MiB fit in a 2 MiB overlay");
    match c.call(Op::Statfs { node: ROOT_NODE }) {
        ReplyBody::Statfs(s) => assert_eq!(s.blocks * s.frsize as u64, 2 << 20),
        other => panic!("{other:?}"),
    }
    c.ok(Op::Fsync {
        fh,
        datasync: false,
    })
    .unwrap();
    server.stop();
    let server = fx.server("s", &["--overlay", &ov]);
    let mut c = server.connect();
    assert_eq!(&c.read_all(e.node).unwrap()[..1 << 20], &first[..]);
}

#[test]
fn punch_hole_frees_space_instead_of_writing_zeros() {
    let fx = Fixture::new();
    let server = fx.server("s", &["--overlay", &fx.overlay("ov")]);
    let mut c = server.connect();
    let (e, fh) = c.create(ROOT_NODE, "f", 0o644, libc::O_RDWR).unwrap();
    let data = pseudo_random(16 << 20, 5);
    for (i, part) in data.chunks(1 << 20).enumerate() {
        c.write(fh, (i as u64) << 20, part).unwrap();
    }
    c.ok(Op::Fsync {
        fh,
        datasync: false,
    })
    .unwrap();
    let upper = fx.dir.join(format!("ov/data/{:016x}", e.node));
    let before = fs::metadata(&upper).unwrap().blocks();
    let punch = |c: &mut Client, fh, offset, length| {
        c.ok(Op::Fallocate {
            fh,
            offset,
            length,
            mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
        })
    };
    punch(&mut c, fh, 100, (16 << 20) - 200).unwrap();
    let after = fs::metadata(&upper).unwrap().blocks();
    assert!(
        after * 8 < before,
        "st_blocks {before} -> {after}: the hole was written, not punched"
    );
    let got = c.read_all(e.node).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert_eq!(&got[..100], &data[..100]);
    assert!(got[100..(16 << 20) - 100].iter().all(|&b| b == 0));
    assert_eq!(&got[(16 << 20) - 100..], &data[(16 << 20) - 100..]);
    // In a snapshot file: the snapshot's bytes are hidden by the hole.
    let big = c.walk("big.bin").unwrap().node;
    let bh = c.open(big, libc::O_RDWR).unwrap();
    punch(&mut c, bh, 4096, 1 << 20).unwrap();
    let got = c.read_all(big).unwrap();
    let orig = pseudo_random(4 << 20, 7);
    assert_eq!(&got[..4096], &orig[..4096]);
    assert!(got[4096..4096 + (1 << 20)].iter().all(|&b| b == 0));
    assert_eq!(&got[4096 + (1 << 20)..], &orig[4096 + (1 << 20)..]);
}
