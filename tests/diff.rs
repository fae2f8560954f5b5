//! `hexz-host diff`: what a job changed in its overlay, and what differs between two
//! snapshots — from indexes and overlay records only.

use std::fs;
use std::path::Path;

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

fn lines(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            let mut parts = l.split('\t');
            let head = parts.next().unwrap_or("").to_string();
            let what = l.rsplit('(').next().filter(|_| l.contains('('));
            match what {
                Some(w) => format!("{head} ({}", w),
                None => head,
            }
        })
        .collect()
}

fn diff(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<String> {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"diff"];
    all.extend_from_slice(args);
    let r = hexz_host(&all);
    assert_eq!(r.status, 0, "{}", r.stderr);
    lines(&r.stdout_text())
}

/// Flips a byte in the middle of the snapshot's data: anything that reads file data
/// would now fail its BLAKE3 check.
fn damage_data(snap: &Path) {
    let mut b = fs::read(snap).unwrap();
    let at = 4096 + 100_000;
    b[at] ^= 0xff;
    fs::write(snap, b).unwrap();
}

#[test]
fn diff_lists_what_an_overlay_and_a_commit_changed_without_reading_file_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("big.bin"), pseudo_random(1 << 20, 3)).unwrap();
    fs::write(src.join("README.md"), b"# hello\n").unwrap();
    fs::write(src.join("mode.sh"), b"#!/bin/sh\n").unwrap();
    fs::write(src.join("sub/a.txt"), b"a\n").unwrap();
    fs::write(src.join("same.txt"), b"untouched\n").unwrap();
    let snap = dir.join("s.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let ov = dir.join("ov");
    let ov_s = ov.display().to_string();
    {
        let mut server = Server::start(&snap, &dir.join("s.sock"), &["--overlay", &ov_s]);
        let mut c = server.connect();
        let (_, fh) = c.create(ROOT_NODE, "new.txt", 0o644, libc::O_RDWR).unwrap();
        c.write(fh, 0, b"fresh").unwrap();
        let readme = c.walk("README.md").unwrap().node;
        let fh = c.open(readme, libc::O_RDWR).unwrap();
        c.write(fh, 2, b"HELLO").unwrap();
        let mode = c.walk("mode.sh").unwrap().node;
        c.call(Op::Setattr {
            node: mode,
            fh: None,
            mode: Some(0o755),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        });
        let sub = c.walk("sub").unwrap().node;
        c.ok(Op::Unlink {
            parent: sub,
            name: b"a.txt".to_vec(),
        })
        .unwrap();
        c.mkdir(ROOT_NODE, "d").unwrap();
        server.stop();
    }
    let snap2 = dir.join("s2.hxz");
    let r = hexz_host(&[&"commit", &snap, &"--overlay", &ov, &"-o", &snap2]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    damage_data(&snap);

    let got = diff(&[&snap, &"--overlay", &ov]);
    for want in [
        "A /d",
        "A /new.txt",
        "C /README.md",
        "C /mode.sh",
        "D /sub/a.txt",
    ] {
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "{want} missing in {got:?}"
        );
    }
    assert!(got
        .iter()
        .any(|l| l.starts_with("C /mode.sh") && l.ends_with("(metadata)")));
    assert!(got
        .iter()
        .any(|l| l.starts_with("C /README.md") && l.contains("content")));
    assert!(!got
        .iter()
        .any(|l| l.contains("same.txt") || l.contains("big.bin")));

    let json = hexz_host(&[&"diff", &snap, &"--overlay", &ov, &"--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let added: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["change"] == "added")
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(added, ["/d", "/new.txt"]);

    // Two snapshots: the overlay folded into a new one compares the same way, by chunks.
    let got2 = diff(&[&snap, &snap2]);
    for want in [
        "A /d",
        "A /new.txt",
        "C /README.md",
        "C /mode.sh",
        "D /sub/a.txt",
    ] {
        assert!(
            got2.iter().any(|l| l.starts_with(want)),
            "{want} missing in {got2:?}"
        );
    }
    assert!(!got2
        .iter()
        .any(|l| l.contains("same.txt") || l.contains("big.bin")));
    assert!(
        diff(&[&snap2, &snap2]).is_empty(),
        "a snapshot equals itself"
    );
    let fresh = dir.join("fresh.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &fresh]);
    assert_eq!(r.status, 0);
    let same = diff(&[&fresh, &snap]);
    assert!(same.is_empty(), "the same tree packed twice: {same:?}");
}
