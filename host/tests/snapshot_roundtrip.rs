//! Snapshot format on real files: full-fidelity round trips, random reads, corruption.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hexz_e2e::pseudo_random;
use hexz_host::pack::{pack, PackInput};
use hexz_host::snapshot::{Compression, NodeKind, Snapshot, WriterOptions};
use proptest::prelude::*;

fn pack_dir(src: &Path, out: &Path, compression: Compression) -> hexz_host::pack::PackSummary {
    let input = PackInput {
        tree: Some(src.to_path_buf()),
        streams: Vec::new(),
        ..Default::default()
    };
    pack(
        &input,
        out,
        &WriterOptions {
            compression,
            threads: 2,
        },
        &(),
    )
    .expect("pack")
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = nix::sys::time::TimeSpec::new(sec, nsec);
    nix::sys::stat::utimensat(
        None,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

/// A tree holding every file type and every kind of metadata the format keeps.
fn build_full_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/nested/deeper")).unwrap();
    fs::write(root.join("plain.txt"), b"hello, hexz\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("dir/big.bin"), pseudo_random(1_500_000, 1)).unwrap();
    // Same bytes again: must deduplicate.
    fs::write(
        root.join("dir/nested/big-copy.bin"),
        pseudo_random(1_500_000, 1),
    )
    .unwrap();
    // Sparse: data, a 64 MiB hole, data, and a trailing hole.
    let f = fs::File::create(root.join("sparse.img")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&pseudo_random(100_000, 2), 64 << 20)
        .unwrap();
    f.set_len(80 << 20).unwrap();
    drop(f);
    fs::write(root.join("zeros"), vec![0u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("plain.txt", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("missing/target", root.join("dir/dangling")).unwrap();
    fs::hard_link(root.join("plain.txt"), root.join("dir/hardlink")).unwrap();
    fs::hard_link(root.join("plain.txt"), root.join("dir/nested/hardlink2")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let is_root = nix::unistd::geteuid().is_root();
    if is_root {
        nix::sys::stat::mknod(
            &root.join("null-dev"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            libc::makedev(1, 3),
        )
        .unwrap();
        nix::sys::stat::mknod(
            &root.join("blk-dev"),
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            libc::makedev(7, 200),
        )
        .unwrap();
        std::os::unix::fs::lchown(root.join("plain.txt"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("link-rel"), Some(42), Some(43)).unwrap();
        std::os::unix::fs::lchown(root.join("dir/nested"), Some(1000), Some(100)).unwrap();
    } else {
        eprintln!("note: not root, so device nodes and foreign owners are left out of this tree");
    }
    fs::set_permissions(root.join("dir/big.bin"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("dir/nested"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::set_permissions(
        root.join("dir/nested/deeper"),
        fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o000)).unwrap();
    set_xattr(root.join("plain.txt"), "user.origin", b"test suite");
    set_xattr(root.join("plain.txt"), "user.empty", b"");
    set_xattr(root.join("dir"), "user.dirattr", &[0u8, 1, 2, 255]);
    for (i, p) in [
        "plain.txt",
        "dir/big.bin",
        "sparse.img",
        "link-rel",
        "fifo",
        "dir/nested/deeper",
        "dir/nested",
        "dir",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(
            &root.join(p),
            1_000_000_000 + i as i64 * 1000,
            123_456_789 + i as i64,
        );
    }
}

/// Sets an xattr; a file system without user xattrs is reported, anything else fails.
fn set_xattr(path: impl AsRef<Path>, name: &str, value: &[u8]) {
    match xattr::set(path.as_ref(), name, value) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            eprintln!("SKIP xattr {name}: this file system has no user xattrs")
        }
        Err(e) => panic!("setxattr {name} on {}: {e}", path.as_ref().display()),
    }
}

fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<_> = xattr::list(p)
        .unwrap()
        .map(|n| {
            let val = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n.as_bytes().to_vec(), val)
        })
        .collect();
    v.sort();
    v
}

/// Compares two trees field by field; returns every difference found.
fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut inode_map: HashMap<u64, u64> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = match (fs::symlink_metadata(&pa), fs::symlink_metadata(&pb)) {
            (Ok(x), Ok(y)) => (x, y),
            (x, y) => {
                diffs.push(format!(
                    "{}: presence differs ({} vs {})",
                    rel.display(),
                    x.is_ok(),
                    y.is_ok()
                ));
                continue;
            }
        };
        let mut field = |name: &str, x: String, y: String| {
            if x != y {
                diffs.push(format!("{}: {name} {x} != {y}", rel.display()));
            }
        };
        field(
            "mode",
            format!("{:o}", ma.mode()),
            format!("{:o}", mb.mode()),
        );
        field("uid", ma.uid().to_string(), mb.uid().to_string());
        field("gid", ma.gid().to_string(), mb.gid().to_string());
        field(
            "mtime",
            format!("{}.{}", ma.mtime(), ma.mtime_nsec()),
            format!("{}.{}", mb.mtime(), mb.mtime_nsec()),
        );
        field("nlink", ma.nlink().to_string(), mb.nlink().to_string());
        if !ma.is_dir() {
            field("size", ma.len().to_string(), mb.len().to_string());
        }
        if ma.file_type().is_char_device() || ma.file_type().is_block_device() {
            field("rdev", ma.rdev().to_string(), mb.rdev().to_string());
        }
        if !ma.file_type().is_symlink() {
            field(
                "xattrs",
                format!("{:?}", xattrs_of(&pa)),
                format!("{:?}", xattrs_of(&pb)),
            );
        }
        if ma.nlink() > 1 && !ma.is_dir() {
            let want = *inode_map.entry(ma.ino()).or_insert(mb.ino());
            field("hard-link group", want.to_string(), mb.ino().to_string());
        }
        if ma.file_type().is_symlink() {
            field(
                "target",
                format!("{:?}", fs::read_link(&pa).unwrap()),
                format!("{:?}", fs::read_link(&pb).unwrap()),
            );
        } else if ma.is_file() {
            if fs::read(&pa).unwrap() != fs::read(&pb).unwrap() {
                diffs.push(format!("{}: contents differ", rel.display()));
            }
        } else if ma.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (na, nb) = (names(&pa), names(&pb));
            if na != nb {
                diffs.push(format!("{}: entries {na:?} != {nb:?}", rel.display()));
            }
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        }
    }
    diffs
}

#[test]
fn every_file_type_and_metadata_survive_pack_and_extract() {
    for compression in [Compression::Zstd { level: 3 }, Compression::Lz4] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        build_full_tree(&src);
        let out = tmp.path().join("snap.hxz");
        let summary = pack_dir(&src, &out, compression);
        assert!(
            summary.stats.bytes_deduped >= 1_400_000,
            "identical files were not deduplicated: {:?}",
            summary.stats
        );
        assert!(
            summary.stats.bytes_zero >= 80 << 20,
            "holes and zero runs were stored: {:?}",
            summary.stats
        );
        let snap = Snapshot::open(&out).unwrap();
        let dest = tmp.path().join("dest");
        hexz_host::extract::extract(&snap, &dest).unwrap();
        // Directory mtimes are compared after extraction finished touching them.
        let diffs = compare_trees(&src, &dest);
        assert!(
            diffs.is_empty(),
            "{compression:?}: differences after round trip:\n{}",
            diffs.join("\n")
        );
        // Holes stay holes on extract.
        let blocks = fs::metadata(dest.join("sparse.img")).unwrap().blocks();
        assert!(
            blocks * 512 < 8 << 20,
            "sparse file was filled in: {blocks} blocks"
        );
    }
}

#[test]
fn snapshot_file_is_far_smaller_than_a_tree_of_duplicates_and_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let blob = pseudo_random(2_000_000, 9);
    for i in 0..10 {
        fs::write(src.join(format!("copy{i}")), &blob).unwrap();
    }
    let out = tmp.path().join("s.hxz");
    pack_dir(&src, &out, Compression::default());
    let len = fs::metadata(&out).unwrap().len();
    assert!(len < 2_200_000, "10 copies of 2 MB stored in {len} bytes");
}

#[test]
fn lookup_and_metadata_need_no_frame_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_full_tree(&src);
    let out = tmp.path().join("s.hxz");
    pack_dir(&src, &out, Compression::default());
    let snap = Snapshot::open(&out).unwrap();
    let idx = snap.resolve("dir/nested/big-copy.bin").unwrap();
    let node = snap.node(idx).unwrap();
    assert!(matches!(node.kind, NodeKind::File(ref d) if d.size == 1_500_000));
    assert_eq!(snap.cache_weight(), 0, "metadata access read frame data");
    assert!(snap.resolve("dir/nope").is_err());
    assert!(snap.resolve("plain.txt/x").is_err());
}

#[test]
fn stream_only_snapshot_reads_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    let f = fs::File::create(&disk).unwrap();
    f.write_all_at(&pseudo_random(700_000, 3), 0).unwrap();
    f.write_all_at(&pseudo_random(700_000, 3), 10 << 20)
        .unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let mem = tmp.path().join("mem.img");
    fs::write(&mem, pseudo_random(300_000, 4)).unwrap();
    let out = tmp.path().join("s.hxz");
    let input = PackInput {
        tree: None,
        streams: vec![
            ("disk".into(), disk.clone()),
            ("memory".into(), mem.clone()),
        ],
        ..Default::default()
    };
    pack(&input, &out, &WriterOptions::default(), &()).unwrap();
    let snap = Snapshot::open(&out).unwrap();
    assert!(!snap.has_tree());
    for (name, path) in [("disk", &disk), ("memory", &mem)] {
        let want = fs::read(path).unwrap();
        let s = snap.stream(name).unwrap();
        let mut got = vec![0u8; want.len()];
        assert_eq!(snap.read_at(&s.data, 0, &mut got).unwrap(), want.len());
        assert!(got == want, "stream {name} differs");
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Random(usize, u64),
    Zeros(usize),
    RepeatPrevious,
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        (1usize..300_000, any::<u64>()).prop_map(|(l, s)| Segment::Random(l, s)),
        (1usize..200_000).prop_map(Segment::Zeros),
        Just(Segment::RepeatPrevious),
    ]
}

fn materialize(segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev: Vec<u8> = Vec::new();
    for s in segs {
        let bytes = match s {
            Segment::Random(l, seed) => pseudo_random(*l, *seed),
            Segment::Zeros(l) => vec![0; *l],
            Segment::RepeatPrevious => prev.clone(),
        };
        out.extend_from_slice(&bytes);
        prev = bytes;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_of_random_files_are_exact(
        files in prop::collection::vec(prop::collection::vec(segment(), 0..5), 1..6),
        reads in prop::collection::vec((any::<prop::sample::Index>(), 0usize..400_000), 1..40),
        lz4 in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        let contents: Vec<Vec<u8>> = files.iter().map(|f| materialize(f)).collect();
        for (i, c) in contents.iter().enumerate() {
            fs::write(src.join(format!("f{i}")), c).unwrap();
        }
        let out = tmp.path().join("s.hxz");
        let compression = if lz4 { Compression::Lz4 } else { Compression::default() };
        pack_dir(&src, &out, compression);
        let snap = Snapshot::open_with_cache(&out, 1 << 20).unwrap();
        for (i, c) in contents.iter().enumerate() {
            let idx = snap.resolve(&format!("f{i}")).unwrap();
            let NodeKind::File(data) = &snap.node(idx).unwrap().kind else { panic!("not a file") };
            prop_assert_eq!(data.size, c.len() as u64);
            for (at, len) in &reads {
                let off = if c.is_empty() { 0 } else { at.index(c.len() + 10) };
                let mut buf = vec![0xAAu8; *len];
                let n = snap.read_at(data, off as u64, &mut buf).unwrap();
                let want = c.get(off.min(c.len())..(off + len).min(c.len())).unwrap_or(&[]);
                prop_assert_eq!(n, want.len());
                prop_assert!(&buf[..n] == want, "bytes differ at {} len {}", off, len);
            }
        }
    }
}

/// Reads every file of the snapshot; returns Ok(true) if all bytes are exact, Err on any error.
fn read_everything(
    snap: &Snapshot,
    originals: &HashMap<String, Vec<u8>>,
) -> Result<bool, hexz_host::Error> {
    let mut exact = true;
    for (name, want) in originals {
        let idx = snap.resolve(name)?;
        let NodeKind::File(data) = &snap
            .node(idx)
            .ok_or(hexz_host::Error::NotFound(name.clone()))?
            .kind
        else {
            return Err(hexz_host::Error::NotFound(name.clone()));
        };
        let mut got = vec![0u8; want.len()];
        let n = snap.read_at(data, 0, &mut got)?;
        exact &= n == want.len() && &got == want;
    }
    Ok(exact)
}

#[test]
fn every_flipped_byte_and_every_truncation_gives_exact_bytes_or_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut originals = HashMap::new();
    for i in 0..6u64 {
        let mut c = pseudo_random(20_000 + i as usize * 9_000, i);
        c.extend(b"some compressible text ".repeat(2000));
        fs::write(src.join(format!("f{i}")), &c).unwrap();
        originals.insert(format!("f{i}"), c);
    }
    let out = tmp.path().join("s.hxz");
    pack_dir(&src, &out, Compression::default());
    let good = fs::read(&out).unwrap();
    let bad_path = tmp.path().join("bad.hxz");
    let step = (good.len() / 1500).max(1);
    let (mut errors, mut exact) = (0, 0);
    let mut positions: Vec<usize> = (0..good.len()).step_by(step).collect();
    positions.extend(0..128); // every header byte
    positions.extend(good.len().saturating_sub(200)..good.len()); // the index's tail
    for pos in positions {
        for mask in [0x01u8, 0x80] {
            let mut b = good.clone();
            b[pos] ^= mask;
            fs::write(&bad_path, &b).unwrap();
            let result = Snapshot::open_with_cache(&bad_path, 1 << 20)
                .and_then(|s| read_everything(&s, &originals));
            match result {
                Ok(true) => exact += 1,
                Ok(false) => panic!(
                    "flip of bit {mask:#x} at byte {pos} returned wrong bytes without an error"
                ),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("bad.hxz"),
                        "error does not name the snapshot: {msg}"
                    );
                    errors += 1;
                }
            }
        }
    }
    assert!(errors > 0);
    for cut in (0..good.len())
        .step_by(step.max(97))
        .chain([good.len() - 1, 7, 127, 128])
    {
        fs::write(&bad_path, &good[..cut]).unwrap();
        let err = Snapshot::open(&bad_path)
            .err()
            .unwrap_or_else(|| panic!("truncation to {cut} bytes opened"));
        // A truncated snapshot is damage, reported as such and naming the file.
        assert!(err.is_corruption(), "truncation to {cut} bytes: {err}");
        assert!(err.to_string().contains("bad.hxz"), "{err}");
    }
    eprintln!("flips: {errors} detected, {exact} harmless (bytes exact)");
}

#[test]
fn a_failed_pack_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let outdir = tmp.path().join("out");
    fs::create_dir(&outdir).unwrap();
    let out = outdir.join("s.hxz");
    let input = PackInput {
        tree: None,
        streams: vec![("disk".into(), tmp.path().join("does-not-exist"))],
        ..Default::default()
    };
    let err = pack(&input, &out, &WriterOptions::default(), &()).unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
    // A source that vanishes mid-way: a directory as a stream is refused.
    let input = PackInput {
        tree: None,
        streams: vec![("disk".into(), tmp.path().to_path_buf())],
        ..Default::default()
    };
    assert!(pack(&input, &out, &WriterOptions::default(), &()).is_err());
    let left: Vec<_> = fs::read_dir(&outdir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!Path::new(&out).exists());
}

/// Files show the inode numbers they had when packed, keep the ones the overlay gave
/// them through a commit, and new files get numbers above every other.
#[test]
fn inode_numbers_survive_pack_and_commit() {
    use hexz_host::commit::{commit, CommitOptions};
    use hexz_host::vfs::{Vfs, ROOT};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/a.txt"), b"a").unwrap();
    fs::write(src.join("b.txt"), b"b").unwrap();
    let snap_path = tmp.path().join("s.hxz");
    pack_dir(&src, &snap_path, Compression::Zstd { level: 3 });
    let ino = |p: &str| fs::symlink_metadata(src.join(p)).unwrap().ino();

    let vfs = Vfs::new(
        Arc::new(Snapshot::open(&snap_path).unwrap()),
        Some(&tmp.path().join("ov")),
        false,
    )
    .unwrap();
    let d = vfs.lookup(1, ROOT, b"d").unwrap();
    assert_eq!(d.ino, ino("d"));
    assert_eq!(vfs.lookup(1, d.ino, b"a.txt").unwrap().ino, ino("d/a.txt"));
    assert_eq!(vfs.lookup(1, ROOT, b"b.txt").unwrap().ino, ino("b.txt"));
    let (new, fh) = vfs
        .create(1, d.ino, b"new.txt", 0o644, libc::O_RDWR as u32, 0, 0)
        .unwrap();
    vfs.release(1, fh).unwrap();
    let biggest = ["d", "d/a.txt", "b.txt"]
        .map(ino)
        .into_iter()
        .max()
        .unwrap();
    assert!(
        new.ino > biggest,
        "new file {} collides below {biggest}",
        new.ino
    );
    drop(vfs);

    let out = tmp.path().join("c.hxz");
    commit(
        &snap_path,
        &tmp.path().join("ov"),
        &out,
        &CommitOptions::default(),
    )
    .unwrap();
    let vfs = Vfs::new(Arc::new(Snapshot::open(&out).unwrap()), None, true).unwrap();
    assert_eq!(vfs.lookup(1, ROOT, b"d").unwrap().ino, ino("d"));
    assert_eq!(vfs.lookup(1, d.ino, b"a.txt").unwrap().ino, ino("d/a.txt"));
    assert_eq!(vfs.lookup(1, d.ino, b"new.txt").unwrap().ino, new.ino);

    // Sequential numbering on request: 1, 2, 3... in node order.
    let seq = tmp.path().join("seq.hxz");
    let input = PackInput {
        tree: Some(src.clone()),
        sequential_inodes: true,
        ..Default::default()
    };
    pack(&input, &seq, &WriterOptions::default(), &()).unwrap();
    let s = Snapshot::open(&seq).unwrap();
    assert!(s.node_ids().table().is_none());
    assert_eq!(s.node_id(2), 3);
}
