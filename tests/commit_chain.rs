//! `hexz-host commit`: overlays folded into new snapshots, chained ten deep with edits at
//! every level, each level read back exactly; a missing or wrong base is a clear error.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

/// Every regular file of a tree, by relative path.
fn files_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn check_level(snap: &Path, model: &BTreeMap<String, Vec<u8>>, dir: &Path, what: &str) {
    let r = hexz_host(&[&"verify", &snap]);
    assert_eq!(r.status, 0, "{what}: verify: {}", r.stderr);
    let out = dir.join(format!("x-{what}"));
    let r = hexz_host(&[&"extract", &snap, &out]);
    assert_eq!(r.status, 0, "{what}: extract: {}", r.stderr);
    let got = files_of(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>(),
        "{what}: file set"
    );
    for (k, v) in model {
        assert!(got[k] == *v, "{what}: {k} differs");
    }
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn ten_chained_commits_with_edits_at_every_level_read_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("big.bin"), pseudo_random(3_000_000, 1)).unwrap();
    fs::write(src.join("lib/keep.txt"), b"unchanged all along\n").unwrap();
    fs::write(src.join("notes.txt"), b"v0\n").unwrap();
    let mut snaps: Vec<PathBuf> = vec![dir.join("s0.hxz")];
    assert_eq!(hexz_host(&[&"pack", &src, &"-o", &snaps[0]]).status, 0);
    let mut model = files_of(&src);

    for level in 1..=10u64 {
        let base = snaps.last().unwrap().clone();
        let ov = dir.join(format!("ov{level}"));
        let mut server = Server::start(
            &base,
            &dir.join("s.sock"),
            &["--overlay", ov.to_str().unwrap()],
        );
        let mut c = server.connect();
        let rw = libc::O_RDWR;
        // a new file
        let name = format!("f{level}.dat");
        let data = pseudo_random(50_000 + level as usize * 1000, level + 100);
        let (_, fh) = c
            .create(ROOT_NODE, &name, 0o644, rw | libc::O_CREAT)
            .unwrap();
        c.write(fh, 0, &data).unwrap();
        c.ok(Op::Release { fh }).unwrap();
        model.insert(name, data);
        // a patch inside the big snapshot file
        let big = c.walk("big.bin").unwrap();
        let fh = c.open(big.node, rw).unwrap();
        let off = level * 250_001;
        c.write(fh, off, &[level as u8; 3000]).unwrap();
        c.ok(Op::Release { fh }).unwrap();
        model.get_mut("big.bin").unwrap()[off as usize..off as usize + 3000].fill(level as u8);
        // delete a file made two levels ago, rename another, rewrite a small one
        let old = format!("f{}.dat", level.saturating_sub(2));
        if model.contains_key(&old) {
            c.ok(Op::Unlink {
                parent: ROOT_NODE,
                name: old.clone().into_bytes(),
            })
            .unwrap();
            model.remove(&old);
        }
        if level == 5 {
            let lib = c.walk("lib").unwrap();
            c.ok(Op::Rename {
                parent: ROOT_NODE,
                name: b"f4.dat".to_vec(),
                new_parent: lib.node,
                new_name: b"moved.dat".to_vec(),
                flags: 0,
            })
            .unwrap();
            let v = model.remove("f4.dat").unwrap();
            model.insert("lib/moved.dat".into(), v);
        }
        let notes = c.walk("notes.txt").unwrap();
        let fh = c.open(notes.node, rw | libc::O_TRUNC).unwrap();
        let text = format!("v{level}\n").into_bytes();
        c.write(fh, 0, &text).unwrap();
        c.ok(Op::Release { fh }).unwrap();
        model.insert("notes.txt".into(), text);
        drop(c);
        assert!(server.stop().success());

        let next = dir.join(format!("s{level}.hxz"));
        let r = hexz_host(&[&"commit", &base, &"--overlay", &ov, &"-o", &next]);
        assert_eq!(r.status, 0, "level {level}: commit: {}", r.stderr);
        let size = fs::metadata(&next).unwrap().len();
        assert!(
            size < 400_000,
            "level {level}: {size} bytes: unchanged data was copied instead of shared"
        );
        check_level(&next, &model, dir, &format!("level{level}"));
        snaps.push(next);
    }

    let top = snaps.last().unwrap().clone();
    let r = hexz_host(&[&"info", &top, &"--json"]);
    let info: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(info["format_version"], 2);
    assert!(
        info["base"].as_str().unwrap().starts_with("s9.hxz"),
        "{}",
        info["base"]
    );

    // Standalone: needs nothing else.
    let alone = dir.join("alone.hxz");
    let ov_empty = dir.join("ov-empty");
    let mut s = Server::start(
        &top,
        &dir.join("e.sock"),
        &["--overlay", ov_empty.to_str().unwrap()],
    );
    assert!(s.stop().success());
    let r = hexz_host(&[
        &"commit",
        &top,
        &"--overlay",
        &ov_empty,
        &"-o",
        &alone,
        &"--standalone",
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);

    // A missing base is an error naming it, never zeros.
    let hidden = dir.join("s9.hidden");
    fs::rename(&snaps[9], &hidden).unwrap();
    let r = hexz_host(&[&"cat", &top, &"big.bin"]);
    assert_ne!(r.status, 0);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("base snapshot") && r.stderr.contains("s9.hxz"),
        "{}",
        r.stderr
    );
    // A different file under the base's name is refused by id.
    fs::copy(&snaps[0], &snaps[9]).unwrap();
    let r = hexz_host(&[&"cat", &top, &"big.bin"]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("has id"), "{}", r.stderr);
    fs::remove_file(&snaps[9]).unwrap();
    // The standalone snapshot reads back on its own.
    for s in &snaps[..9] {
        fs::remove_file(s).unwrap();
    }
    check_level(&alone, &model, dir, "standalone");
}
