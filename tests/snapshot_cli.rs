//! `hexz-host pack/info/verify/ls/cat/extract` as a user runs them, including bad input.

use std::fs;

use hexz_e2e::{hexz_host, sample_tree};

fn packed() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_tree(&src);
    let snap = tmp.path().join("ws.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "pack failed: {}", r.stderr);
    let line = r.stdout_text();
    assert!(
        line.starts_with("packed 4 files, 3 dirs, 1 symlinks"),
        "summary: {line}"
    );
    (tmp, src, snap)
}

#[test]
fn pack_then_cat_ls_info_verify_extract_agree_with_the_source() {
    let (tmp, src, snap) = packed();

    let r = hexz_host(&[&"cat", &snap, &"src/main.rs"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.stdout, fs::read(src.join("src/main.rs")).unwrap());
    let r = hexz_host(&[&"cat", &snap, &"main-link"]);
    assert_eq!(
        r.stdout,
        fs::read(src.join("src/main.rs")).unwrap(),
        "cat follows symlinks inside the snapshot"
    );
    let r = hexz_host(&[&"cat", &snap, &"blob.bin"]);
    assert_eq!(r.stdout, fs::read(src.join("blob.bin")).unwrap());

    let r = hexz_host(&[&"ls", &snap, &"/"]);
    let names: Vec<String> = r
        .stdout_text()
        .lines()
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["README.md", "blob.bin", "src/main.rs", "src"],
        "ls output:\n{}",
        r.stdout_text()
    );
    assert!(r
        .stdout_text()
        .lines()
        .any(|l| l.starts_with('l') && l.contains("main-link -> src/main.rs")));

    let r = hexz_host(&[&"info", &snap, &"--json"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let info: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(info["files"], 4);
    assert_eq!(info["dirs"], 3);
    assert_eq!(info["symlinks"], 1);
    assert_eq!(info["hardlinked_files"], 1);
    assert_eq!(info["format_version"], 1);
    assert_eq!(info["id"].as_str().unwrap().len(), 64);

    let r = hexz_host(&[&"verify", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stdout_text().contains(": OK:"), "{}", r.stdout_text());

    let dest = tmp.path().join("out");
    let r = hexz_host(&[&"extract", &snap, &dest]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    for p in [
        "README.md",
        "src/main.rs",
        "src/bin/tool.rs",
        "blob.bin",
        "src/README-again.md",
    ] {
        assert_eq!(
            fs::read(src.join(p)).unwrap(),
            fs::read(dest.join(p)).unwrap(),
            "{p}"
        );
    }
    assert_eq!(
        fs::read_link(dest.join("main-link")).unwrap(),
        fs::read_link(src.join("main-link")).unwrap()
    );

    // Extracting over a non-empty directory is refused and changes nothing.
    let r = hexz_host(&[&"extract", &snap, &dest]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);
}

#[test]
fn streams_pack_and_cat_back() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[1_000_000..1_000_100].copy_from_slice(&[0xab; 100]);
    fs::write(&disk, &bytes).unwrap();
    let snap = tmp.path().join("vm.hxz");
    let r = hexz_host(&[
        &"pack",
        &"-o",
        &snap,
        &"--disk",
        &disk,
        &"--compression",
        &"lz4",
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let r = hexz_host(&[&"cat", &snap, &"disk"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stdout == bytes, "disk stream differs");
    let r = hexz_host(&[&"cat", &snap, &"memory"]);
    assert_ne!(r.status, 0);
}

#[test]
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let (tmp, _src, snap) = packed();
    let good = fs::read(&snap).unwrap();
    let bad = tmp.path().join("bad.hxz");
    let check = |what: &str, args: &[&dyn AsRef<std::ffi::OsStr>], expect: &str| {
        let r = hexz_host(args);
        assert_ne!(r.status, 0, "{what}: exit 0");
        assert!(
            r.stdout.is_empty() || what.starts_with("verify"),
            "{what}: printed data"
        );
        let line = r.stderr.trim_end();
        assert!(
            line.contains(expect),
            "{what}: stderr {line:?} lacks {expect:?}"
        );
        assert!(!line.contains("panicked"), "{what}: panic: {line}");
    };
    check(
        "missing file",
        &[&"info", &tmp.path().join("nope.hxz")],
        "No such file",
    );
    fs::write(&bad, b"this is not a snapshot at all, just some text padding it out past 128 bytes .......................................................").unwrap();
    check("not a snapshot", &[&"info", &bad], "not a hexz snapshot");
    fs::write(&bad, &good[..good.len() / 2]).unwrap();
    check("truncated", &[&"ls", &bad], "corrupt snapshot");
    let mut v = good.clone();
    v[8] = 9;
    fs::write(&bad, &v).unwrap();
    check(
        "unknown version",
        &[&"info", &bad],
        "version 9 is not supported",
    );
    let mut v = good.clone();
    v[300] ^= 0x40; // inside the first frame
    fs::write(&bad, &v).unwrap();
    check("verify of flipped data", &[&"verify", &bad], "damaged");
    check(
        "cat of flipped data",
        &[&"cat", &bad, &"blob.bin"],
        "bad.hxz",
    );
    let mut v = good.clone();
    let n = v.len();
    v[n - 10] ^= 0x01; // inside the index
    fs::write(&bad, &v).unwrap();
    check("flipped index", &[&"info", &bad], "corrupt snapshot");
    check(
        "missing path",
        &[&"cat", &snap, &"no/such/file"],
        "no such file",
    );
    check(
        "cat a directory",
        &[&"cat", &snap, &"src"],
        "is a directory",
    );

    // Packing an unreadable source leaves nothing under the output name.
    let out = tmp.path().join("new.hxz");
    check(
        "pack missing source",
        &[&"pack", &tmp.path().join("absent"), &"-o", &out],
        "absent",
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hexz-pack"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}
