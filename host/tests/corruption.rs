//! Random corruption campaign: byte flips (1–8 bytes anywhere, or aimed at the header,
//! a frame or the index), truncations and appended bytes, each followed by a full read
//! of every file through the VFS (tree walked with lookups, files read in pieces and at
//! random offsets) and by `verify` (open, then load and check every frame, as
//! `hexz-host verify` does; the real binary is run on every 10th case and must agree).
//!
//! Asserted: 0 wrong bytes (every read is exact or an error), and every damaged
//! snapshot that `verify` passes reads back exactly (the damage landed in bytes that do
//! not change what is decoded — counted and classified, see docs/RELIABILITY.md).
//! `HEXZ_CORRUPTION_CASES` sets the number of cases (default 200; the recorded run used
//! 2,000).

use hexz_e2e::Rng;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use hexz_e2e::pseudo_random;
use hexz_host::pack::{pack, PackInput};
use hexz_host::snapshot::{Compression, Snapshot, WriterOptions};
use hexz_host::vfs::Vfs;

const OWNER: u64 = 1;

/// A tree with small files sharing frames, multi-frame files, a sparse file, a
/// duplicate, a hard link and nested directories.
fn build_tree(src: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut put = |rel: &str, data: Vec<u8>| {
        let p = src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        files.insert(rel.to_string(), data);
    };
    for i in 0..12u64 {
        put(
            &format!("src/mod{i}.rs"),
            format!("pub fn f{i}() -> u64 {{ {i} }}\n")
                .repeat(20 + i as usize * 7)
                .into_bytes(),
        );
    }
    put("data/random.bin", pseudo_random(400_000, 1));
    let mut mixed = pseudo_random(60_000, 2);
    mixed.extend(b"compressible text, again and again. ".repeat(5_000));
    put("data/mixed.bin", mixed);
    put("data/copy.bin", pseudo_random(400_000, 1));
    put("a/b/c/deep.txt", b"deep\n".to_vec());
    put("empty", Vec::new());
    // Sparse: data, a 1 MiB hole, data.
    let sparse = src.join("data/sparse.bin");
    let f = fs::File::create(&sparse).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pseudo_random(50_000, 3), 0).unwrap();
    f.write_all_at(&pseudo_random(50_000, 4), 1_100_000)
        .unwrap();
    drop(f);
    files.insert("data/sparse.bin".into(), fs::read(&sparse).unwrap());
    fs::hard_link(src.join("empty"), src.join("a/empty-link")).unwrap();
    files.insert("a/empty-link".into(), Vec::new());
    files
}

/// Reads every file through the VFS, going on after errors so that files the damage
/// did not reach are checked too. Returns (reads that returned bytes, errors); an error
/// opening the snapshot counts as one. Panics on a wrong byte.
fn read_all_through_vfs(
    path: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    rng: &mut Rng,
) -> (u64, u64) {
    let snap = match Snapshot::open_with_cache(path, 4 << 20) {
        Ok(s) => Arc::new(s),
        Err(_) => return (0, 1),
    };
    let vfs = match Vfs::new(snap, None, true) {
        Ok(v) => v,
        Err(_) => return (0, 1),
    };
    let (mut reads, mut errors) = (0u64, 0u64);
    'files: for (rel, want) in files {
        let mut node = 1u64;
        for part in rel.split('/') {
            match vfs.lookup(OWNER, node, part.as_bytes()) {
                Ok(a) => node = a.ino,
                Err(_) => {
                    errors += 1;
                    continue 'files;
                }
            }
        }
        let attr = vfs
            .getattr(OWNER, node, None)
            .expect("getattr of a found node");
        assert_eq!(attr.size, want.len() as u64, "{rel}: wrong size");
        let fh = vfs.open(OWNER, node, 0).expect("open");
        let mut off = 0usize;
        while off <= want.len() {
            match vfs.read(OWNER, fh, off as u64, 65_536) {
                Ok(got) => {
                    reads += 1;
                    let end = (off + got.len()).min(want.len());
                    assert!(
                        got.len() <= want.len() - off && got[..] == want[off..end],
                        "WRONG BYTES: {rel} at {off} ({} bytes)",
                        got.len()
                    );
                    if got.is_empty() {
                        break;
                    }
                }
                Err(_) => errors += 1,
            }
            // After an error, skip to the next piece: later pieces may be intact.
            off += 65_536.min(want.len() - off).max(1);
        }
        for _ in 0..4 {
            let at = rng.index(want.len() + 10);
            let size = 1 + rng.index(100_000) as u32;
            match vfs.read(OWNER, fh, at as u64, size) {
                Ok(got) => {
                    reads += 1;
                    let lo = at.min(want.len());
                    let hi = (at + size as usize).min(want.len());
                    assert!(got[..] == want[lo..hi], "WRONG BYTES: {rel} at {at}+{size}");
                }
                Err(_) => errors += 1,
            }
        }
        vfs.release(OWNER, fh).expect("release");
    }
    (reads, errors)
}

/// What `hexz-host verify` does: open, then load and check every frame.
fn verify(path: &Path) -> Result<(), String> {
    let snap = Snapshot::open_with_cache(path, 1 << 20).map_err(|e| e.to_string())?;
    for i in 0..snap.index().frames.len() {
        snap.load_frame(i as u32).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Where byte `pos` of the good snapshot lies.
fn region(snap: &Snapshot, pos: usize) -> String {
    if pos < 128 {
        return format!("header byte {pos}");
    }
    for (i, f) in snap.index().frames.iter().enumerate() {
        if (pos as u64) >= f.offset && (pos as u64) < f.offset + f.stored_len as u64 {
            let codec = ["raw", "zstd", "lz4"].get(f.codec as usize).unwrap_or(&"?");
            return format!("frame {i} ({codec}) byte {}", pos as u64 - f.offset);
        }
    }
    "index".into()
}

#[test]
fn random_flips_and_truncations_give_exact_bytes_or_an_error_and_verify_flags_them() {
    let cases: usize = std::env::var("HEXZ_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = build_tree(&src);
    let mut goods = Vec::new();
    for (name, compression) in [("zstd", Compression::default()), ("lz4", Compression::Lz4)] {
        let out = tmp.path().join(format!("{name}.hxz"));
        pack(
            &PackInput {
                tree: Some(src.clone()),
                streams: vec![],
                ..Default::default()
            },
            &out,
            &WriterOptions {
                compression,
                threads: 1,
            },
            &(),
        )
        .unwrap();
        let snap = Snapshot::open(&out).unwrap();
        let bytes = fs::read(&out).unwrap();
        let data_end = snap
            .index()
            .frames
            .iter()
            .map(|f| f.offset + f.stored_len as u64)
            .max()
            .unwrap_or(128) as usize;
        goods.push((name, bytes, snap, data_end));
    }
    let verify_bin = hexz_e2e::bin("hexz-host");
    let bad = tmp.path().join("bad.hxz");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut stats: BTreeMap<&str, usize> = BTreeMap::new();
    let mut harmless: HashMap<String, usize> = HashMap::new();
    let (mut reads, mut read_errors) = (0u64, 0u64);
    for case in 0..cases {
        let (name, good, snap, data_end) = &goods[case % goods.len()];
        let mut b = good.clone();
        let mut flipped = Vec::new();
        let kind = match rng.index(10) {
            0 | 1 => {
                let cut = rng.index(b.len());
                b.truncate(cut);
                "truncate"
            }
            2 => {
                let extra = 1 + rng.index(4096);
                b.extend(pseudo_random(extra, case as u64));
                "append"
            }
            k => {
                let (lo, hi, kind) = match k {
                    3 => (0, 128, "flip header"),
                    4 => (*data_end, b.len(), "flip index"),
                    5..=7 => (128, *data_end, "flip frames"),
                    _ => (0, b.len(), "flip anywhere"),
                };
                for _ in 0..1 + rng.index(8) {
                    let pos = lo + rng.index(hi - lo);
                    let mask = (1 + rng.index(255)) as u8;
                    b[pos] ^= mask;
                    flipped.push(pos);
                }
                kind
            }
        };
        if b == *good {
            *stats.entry("no change (flips cancelled)").or_default() += 1;
            continue;
        }
        fs::write(&bad, &b).unwrap();
        let verified = verify(&bad);
        if case % 10 == 0 {
            let st = std::process::Command::new(&verify_bin)
                .arg("verify")
                .arg(&bad)
                .output()
                .unwrap();
            assert_eq!(
                st.status.success(),
                verified.is_ok(),
                "case {case}: hexz-host verify disagrees ({:?})",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        let (ok_reads, errors) = read_all_through_vfs(&bad, &files, &mut rng);
        reads += ok_reads;
        read_errors += errors;
        *stats.entry(kind).or_default() += 1;
        match (&verified, errors) {
            (Err(_), 1..) => *stats.entry("detected: verify and read").or_default() += 1,
            (Err(e), 0) => panic!(
                "case {case} ({name} {kind} at {flipped:?}): verify fails ({e}) but every read succeeded exactly"
            ),
            (Ok(()), 1..) => panic!(
                "case {case} ({name} {kind} at {flipped:?}): verify passes but {errors} reads failed"
            ),
            (Ok(()), 0) => {
                *stats.entry("harmless: verify passes, bytes exact").or_default() += 1;
                for &p in &flipped {
                    *harmless
                        .entry(format!("{name}: {}", region(snap, p)))
                        .or_default() += 1;
                }
            }
        }
    }
    println!(
        "corruption cases: {cases}; reads that returned bytes: {reads} (all exact), reads that failed: {read_errors}"
    );
    for (k, v) in &stats {
        println!("  {k}: {v}");
    }
    let mut h: Vec<_> = harmless.into_iter().collect();
    h.sort();
    for (k, v) in h {
        println!("  harmless flip location: {k} (x{v})");
    }
    assert_eq!(
        stats.get("detected: verify and read").copied().unwrap_or(0)
            + stats
                .get("harmless: verify passes, bytes exact")
                .copied()
                .unwrap_or(0)
            + stats
                .get("no change (flips cancelled)")
                .copied()
                .unwrap_or(0),
        cases
    );
}
