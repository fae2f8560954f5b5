//! Many threads on one VFS core at once: punch-hole, readdir(plus), writes, truncation,
//! fsync, renames and lookups, for a bounded time. It must finish (a lock-order cycle
//! deadlocks it: the watchdog fails the test) and every file must read back exactly as
//! a model of its writes says, before and after a restart.

use hexz_e2e::Rng;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexz_host::snapshot::Snapshot;
use hexz_host::vfs::{SetAttr, Vfs, ROOT};

const RUN: Duration = Duration::from_secs(4);
const WATCHDOG: Duration = Duration::from_secs(90);
const PUNCH: u32 = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32;

fn pack(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("many")).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("many/f{i:03}")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(src.join("big.bin"), hexz_e2e::pseudo_random(2 << 20, 9)).unwrap();
    let snap = dir.join("s.hxz");
    let r = hexz_e2e::hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    snap
}

/// Writes, punches, truncates and fsyncs one file, keeping a model of its bytes.
fn file_worker(
    vfs: &Vfs,
    owner: u64,
    node: u64,
    fh: u64,
    mut model: Vec<u8>,
    seed: u64,
) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + RUN;
    while Instant::now() < deadline {
        match rng.below(10) {
            0..=5 => {
                let off = rng.below(1 << 20);
                let len = 1 + rng.below(64 << 10) as usize;
                let data = hexz_e2e::pseudo_random(len, rng.next_u64());
                vfs.write(owner, fh, off, &data).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            6 | 7 if !model.is_empty() => {
                let off = rng.below(model.len() as u64);
                let len = 1 + rng.below(200 << 10);
                vfs.fallocate(owner, fh, off, len, PUNCH).unwrap();
                let end = (off + len).min(model.len() as u64) as usize;
                model[off as usize..end].fill(0);
            }
            8 => {
                let size = rng.below(model.len() as u64 + (64 << 10));
                let set = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                vfs.setattr(owner, node, None, set).unwrap();
                model.resize(size as usize, 0);
            }
            _ => vfs.fsync(owner, fh, false).unwrap(),
        }
    }
    model
}

fn read_all(vfs: &Vfs, owner: u64, node: u64) -> Vec<u8> {
    let fh = vfs.open(owner, node, libc::O_RDONLY as u32).unwrap();
    let mut out = Vec::new();
    loop {
        let d = vfs.read(owner, fh, out.len() as u64, 1 << 20).unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    vfs.release(owner, fh).unwrap();
    out
}

#[test]
fn punch_hole_readdir_writes_and_renames_from_many_threads_finish_and_read_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let snap_path = pack(tmp.path());
    let ov = tmp.path().join("ov");
    let snap = Arc::new(Snapshot::open(&snap_path).unwrap());
    let vfs = Arc::new(Vfs::new(snap.clone(), Some(&ov), false).unwrap());
    let many = vfs.peek(ROOT, b"many").unwrap().ino;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut file_threads = Vec::new();

    // Writers on new files and on a snapshot file (copy-on-write).
    for w in 0..3u64 {
        let (vfs, done) = (vfs.clone(), done_tx.clone());
        file_threads.push(std::thread::spawn(move || {
            let owner = 100 + w;
            let name = format!("w{w}");
            let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
            let (attr, fh) = vfs
                .create(owner, ROOT, name.as_bytes(), 0o644, flags, 0, 0)
                .unwrap();
            let model = file_worker(&vfs, owner, attr.ino, fh, Vec::new(), w + 1);
            vfs.release(owner, fh).unwrap();
            let _ = done.send(());
            (attr.ino, model)
        }));
    }
    {
        let (vfs, done) = (vfs.clone(), done_tx.clone());
        file_threads.push(std::thread::spawn(move || {
            let owner = 200;
            let node = vfs.peek(ROOT, b"big.bin").unwrap().ino;
            let fh = vfs.open(owner, node, libc::O_RDWR as u32).unwrap();
            let model = hexz_e2e::pseudo_random(2 << 20, 9);
            let model = file_worker(&vfs, owner, node, fh, model, 77);
            vfs.release(owner, fh).unwrap();
            let _ = done.send(());
            (node, model)
        }));
    }
    let mut others = Vec::new();
    // Directory readers (readdir and readdirplus with references, then forgets).
    for r in 0..2u64 {
        let (vfs, done) = (vfs.clone(), done_tx.clone());
        others.push(std::thread::spawn(move || {
            let owner = 300 + r;
            let deadline = Instant::now() + RUN;
            while Instant::now() < deadline {
                for dir in [ROOT, many] {
                    let fh = vfs.opendir(owner, dir).unwrap();
                    let mut cookie = 0;
                    loop {
                        let items = vfs.readdir(owner, fh, cookie, 64).unwrap();
                        let Some(last) = items.last() else { break };
                        cookie = last.cookie;
                        for (item, _) in vfs.entries_plus(owner, items) {
                            if item.name != b"." && item.name != b".." {
                                vfs.forget(owner, item.node, 1);
                            }
                        }
                    }
                    vfs.releasedir(owner, fh).unwrap();
                }
            }
            let _ = done.send(());
        }));
    }
    // Namespace churn in the big directory.
    {
        let (vfs, done) = (vfs.clone(), done_tx.clone());
        others.push(std::thread::spawn(move || {
            let owner = 400;
            let mut rng = Rng(5);
            let deadline = Instant::now() + RUN;
            let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
            while Instant::now() < deadline {
                let a = format!("n{}", rng.below(50));
                let b = format!("f{:03}", rng.below(300));
                match rng.below(3) {
                    0 => {
                        if let Ok((attr, fh)) =
                            vfs.create(owner, many, a.as_bytes(), 0o644, flags, 0, 0)
                        {
                            vfs.write(owner, fh, 0, b"new").unwrap();
                            vfs.release(owner, fh).unwrap();
                            vfs.forget(owner, attr.ino, 1);
                        }
                    }
                    1 => {
                        let _ = vfs.rename(many, a.as_bytes(), many, b.as_bytes(), 0);
                    }
                    _ => {
                        let _ = vfs.unlink(many, b.as_bytes());
                    }
                }
            }
            let _ = done.send(());
        }));
    }
    // Lookups and attributes.
    {
        let (vfs, done) = (vfs.clone(), done_tx.clone());
        others.push(std::thread::spawn(move || {
            let owner = 500;
            let deadline = Instant::now() + RUN;
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let name = format!("f{:03}", i % 300);
                if let Ok(a) = vfs.lookup(owner, many, name.as_bytes()) {
                    let _ = vfs.getattr(owner, a.ino, None);
                    vfs.forget(owner, a.ino, 1);
                }
            }
            let _ = done.send(());
        }));
    }
    drop(done_tx);
    let threads = file_threads.len() + others.len();
    for n in 0..threads {
        if done_rx.recv_timeout(WATCHDOG).is_err() {
            panic!(
                "{} of {threads} threads did not finish within {WATCHDOG:?}: deadlock",
                threads - n
            );
        }
    }
    for t in others {
        t.join().unwrap();
    }
    let models: Vec<(u64, Vec<u8>)> = file_threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (node, model) in &models {
        assert!(
            read_all(&vfs, 1, *node) == *model,
            "node {node} differs from its model"
        );
    }
    let stats = vfs.stats();
    assert_eq!(stats.handles, 0, "{stats:?}");
    vfs.shutdown().unwrap();
    drop(vfs);

    let vfs = Vfs::new(snap, Some(&ov), false).unwrap();
    for (node, model) in &models {
        assert!(
            read_all(&vfs, 1, *node) == *model,
            "node {node} differs after a restart"
        );
    }
}
