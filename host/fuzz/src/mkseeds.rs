//! Writes seed inputs for the fuzz targets into `corpus/<target>/` from real snapshots
//! (zstd and lz4 frames, a stream) and a real overlay journal (creates, writes, renames,
//! xattrs, unlinks, fsyncs, a checkpoint).

use std::sync::Arc;

use hexz_host::snapshot::{Compression, Snapshot, WriterOptions};
use hexz_host::vfs::Vfs;

fn main() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snap_dir = std::path::Path::new("corpus/snapshot_open");
    let jr_dir = std::path::Path::new("corpus/journal_replay");
    let index_dir = std::path::Path::new("corpus/index_decode");
    let rec_dir = std::path::Path::new("corpus/record_decode");
    for d in [snap_dir, jr_dir, index_dir, rec_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }

    let base = hexz_host_fuzz::small_snapshot(tmp.path());
    let mut n = 0;
    let mut seed = |name: &str, file: &[u8]| {
        if let Some(input) = hexz_host_fuzz::snapshot_input(file) {
            std::fs::write(snap_dir.join(name), &input).expect("write seed");
            // index_decode: `[flags][raw index]`.
            let data_len = u16::from_le_bytes([input[1], input[2]]) as usize;
            for flags in [0u8, 1, 6] {
                let mut seed = vec![flags];
                seed.extend_from_slice(&input[3 + data_len..]);
                std::fs::write(index_dir.join(format!("{name}-{flags}")), seed).expect("seed");
            }
            n += 1;
        }
    };
    seed("small-zstd", &std::fs::read(&base).expect("read"));
    for (name, compression) in [
        ("small-lz4", Compression::Lz4),
        ("stream-zstd", Compression::default()),
    ] {
        let out = tmp.path().join(format!("{name}.hxz"));
        let stream = tmp.path().join("disk.img");
        std::fs::write(&stream, [1u8, 2, 3].repeat(5000)).expect("write");
        hexz_host::pack::pack(
            &hexz_host::pack::PackInput {
                tree: Some(tmp.path().join("src")),
                streams: vec![("disk".into(), stream)],
                ..Default::default()
            },
            &out,
            &WriterOptions {
                compression,
                threads: 1,
            },
            &(),
        )
        .expect("pack");
        seed(name, &std::fs::read(&out).expect("read"));
    }
    println!("snapshot_open: {n} seeds");

    // A journal from real operations.
    let snap = Arc::new(Snapshot::open(&base).expect("open"));
    let ov = tmp.path().join("overlay");
    {
        let vfs = Vfs::new(snap.clone(), Some(&ov), false).expect("vfs");
        let o = 1;
        let d = vfs.mkdir(o, 1, b"newdir", 0o755, 0, 0).expect("mkdir");
        let (f, fh) = vfs
            .create(o, d.ino, b"new.txt", 0o644, libc_o_rdwr(), 0, 0)
            .expect("create");
        vfs.write(o, fh, 0, b"new bytes").expect("write");
        vfs.fsync(o, fh, false).expect("fsync");
        vfs.release(o, fh).expect("release");
        let a = vfs.lookup(o, 1, b"a.txt").expect("lookup");
        let fh = vfs.open(o, a.ino, libc_o_rdwr()).expect("open");
        vfs.write(o, fh, 3, b"XYZ").expect("write");
        vfs.fsync(o, fh, false).expect("fsync");
        vfs.release(o, fh).expect("release");
        vfs.setxattr(f.ino, b"user.k", b"v", 0).expect("setxattr");
        vfs.rename(d.ino, b"new.txt", 1, b"moved.txt", 0)
            .expect("rename");
        vfs.symlink(o, 1, b"sl", b"moved.txt", 0, 0)
            .expect("symlink");
        vfs.unlink(1, b"link").expect("unlink");
        vfs.shutdown().expect("shutdown");
    }
    let bytes = std::fs::read(ov.join("journal")).expect("journal");
    // Split into frames, drop the header and the Init record, re-frame as fuzz input.
    let mut at = 16;
    let mut payloads = Vec::new();
    while at + 20 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4")) as usize;
        payloads.push(bytes[at + 20..at + 20 + len].to_vec());
        at += 20 + len;
    }
    for (i, p) in payloads.iter().enumerate() {
        std::fs::write(rec_dir.join(format!("rec{i}")), p).expect("seed");
    }
    let body: Vec<u8> = payloads
        .iter()
        .skip(1)
        .flat_map(|p| {
            let mut v = (p.len() as u16).to_le_bytes().to_vec();
            v.extend_from_slice(p);
            v
        })
        .collect();
    for flags in [0u8, 2, 4] {
        let mut input = vec![flags];
        input.extend_from_slice(&body);
        std::fs::write(jr_dir.join(format!("ops-{flags}")), input).expect("seed");
    }
    let mut raw = vec![1u8];
    raw.extend_from_slice(&bytes[16..]);
    std::fs::write(jr_dir.join("raw"), raw).expect("seed");
    println!("journal_replay: 4 seeds ({} records)", payloads.len());
}

fn libc_o_rdwr() -> u32 {
    2
}
