//! docs/PROTOCOL.md against the code: the opcode table (§7.1), the reply table (§7.2), the
//! capability table (§4) and the errno table (§6.1) name exactly what the crate defines,
//! in both directions, and the limits the document states are the crate's constants.
//! (The example frames of §11 are checked byte for byte by golden.rs.)

use std::collections::{BTreeMap, BTreeSet};

use hexz_protocol::cbor::{MAX_DEPTH, MAX_ITEMS};
use hexz_protocol::hello::*;
use hexz_protocol::*;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md")
}

/// The lines of the section whose heading starts with `heading`, up to the next heading.
fn section<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(heading));
    assert!(lines.next().is_some(), "no section {heading}");
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// The body rows of the first table whose header's first cell is `first_header`: cells
/// trimmed, header and separator left out.
fn table(lines: &[&str], first_header: &str) -> Vec<Vec<String>> {
    let cells = |l: &str| -> Vec<String> {
        let l = l.trim();
        l.trim_start_matches('|')
            .trim_end_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let start = lines
        .iter()
        .position(|l| l.starts_with('|') && cells(l)[0] == first_header)
        .unwrap_or_else(|| panic!("no table headed '{first_header}'"));
    let rows: Vec<Vec<String>> = lines[start + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| cells(l))
        .collect();
    let width = cells(lines[start]).len();
    for r in &rows {
        assert_eq!(r.len(), width, "row {r:?} has a stray '|'");
    }
    rows
}

/// Every `backticked` word of a cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn set<'a>(it: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    it.into_iter().map(str::to_string).collect()
}

fn only_name(cell: &str) -> String {
    let t = ticked(cell);
    assert_eq!(t.len(), 1, "cell '{cell}' should name exactly one thing");
    t[0].clone()
}

#[test]
fn the_opcode_table_is_exactly_op_names_and_names_real_replies() {
    let doc = doc();
    let rows = table(&section(&doc, "### 7.1 "), "opcode");
    let documented: Vec<String> = rows.iter().map(|r| only_name(&r[0])).collect();
    assert_eq!(
        documented.iter().cloned().collect::<BTreeSet<_>>(),
        set(Op::NAMES.iter().copied()),
        "§7.1 opcodes vs Op::NAMES"
    );
    assert_eq!(documented.len(), Op::NAMES.len(), "an opcode listed twice");
    for r in &rows {
        let replies = ticked(&r[2]);
        assert!(!replies.is_empty(), "{}: no success reply", r[0]);
        for name in replies {
            assert!(
                ReplyBody::NAMES.contains(&name.as_str()),
                "{}: reply '{name}' does not exist",
                r[0]
            );
        }
    }
}

#[test]
fn the_reply_table_is_exactly_the_reply_variants_and_agrees_with_the_opcode_table() {
    let doc = doc();
    let replies = table(&section(&doc, "### 7.2 "), "variant");
    let documented: Vec<String> = replies.iter().map(|r| only_name(&r[0])).collect();
    assert_eq!(
        documented.iter().cloned().collect::<BTreeSet<_>>(),
        set(ReplyBody::NAMES.iter().copied()),
        "§7.2 variants vs ReplyBody::NAMES"
    );
    assert_eq!(documented.len(), ReplyBody::NAMES.len());
    // Which reply answers which opcode, per §7.2 ...
    let mut answered_by: BTreeMap<String, String> = BTreeMap::new();
    for r in &replies {
        let variant = only_name(&r[0]);
        if variant == "err" {
            assert_eq!(r[2], "any request");
            continue;
        }
        for op in ticked(&r[2]) {
            assert!(
                Op::NAMES.contains(&op.as_str()),
                "§7.2 {variant} answers unknown opcode '{op}'"
            );
            if let Some(other) = answered_by.insert(op.clone(), variant.clone()) {
                panic!("§7.2: {op} answered by both {other} and {variant}");
            }
        }
    }
    assert_eq!(
        answered_by.keys().cloned().collect::<BTreeSet<_>>(),
        set(Op::NAMES.iter().copied()),
        "§7.2 must give every opcode its success reply"
    );
    // ... and per §7.1.
    for r in table(&section(&doc, "### 7.1 "), "opcode") {
        let op = only_name(&r[0]);
        let success = ticked(&r[2]);
        assert_eq!(
            success.first(),
            answered_by.get(&op),
            "{op}: §7.1 and §7.2 disagree on the success reply"
        );
    }
}

/// One request of each opcode (two for rename: with and without flags).
fn samples() -> Vec<Op> {
    let n = b"n".to_vec();
    vec![
        Op::Hello(client::default_hello("t")),
        Op::Lookup {
            parent: 1,
            name: n.clone(),
        },
        Op::Forget {
            node: 2,
            nlookup: 1,
        },
        Op::BatchForget { items: vec![] },
        Op::Retain { items: vec![] },
        Op::Getattr { node: 1, fh: None },
        Op::Setattr {
            node: 1,
            fh: None,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        },
        Op::Readlink { node: 2 },
        Op::Symlink {
            parent: 1,
            name: n.clone(),
            target: n.clone(),
            uid: 0,
            gid: 0,
        },
        Op::Mknod {
            parent: 1,
            name: n.clone(),
            mode: 0,
            rdev: 0,
            uid: 0,
            gid: 0,
        },
        Op::Mkdir {
            parent: 1,
            name: n.clone(),
            mode: 0,
            uid: 0,
            gid: 0,
        },
        Op::Unlink {
            parent: 1,
            name: n.clone(),
        },
        Op::Rmdir {
            parent: 1,
            name: n.clone(),
        },
        Op::Rename {
            parent: 1,
            name: n.clone(),
            new_parent: 1,
            new_name: n.clone(),
            flags: 0,
        },
        Op::Rename {
            parent: 1,
            name: n.clone(),
            new_parent: 1,
            new_name: n.clone(),
            flags: RENAME_NOREPLACE,
        },
        Op::Link {
            node: 2,
            new_parent: 1,
            new_name: n.clone(),
        },
        Op::Open {
            node: 2,
            flags: 0,
            read: None,
        },
        Op::Read {
            fh: 1,
            offset: 0,
            size: 1,
        },
        Op::Write {
            fh: 1,
            offset: 0,
            data: vec![],
        },
        Op::Flush {
            fh: 1,
            lock_owner: 0,
        },
        Op::Release { fh: 1 },
        Op::Fsync {
            fh: 1,
            datasync: false,
        },
        Op::Opendir {
            node: 1,
            list: None,
        },
        Op::Readdir {
            fh: 1,
            cookie: 0,
            max_entries: 1,
        },
        Op::Readdirplus {
            fh: 1,
            cookie: 0,
            max_entries: 1,
        },
        Op::Releasedir { fh: 1 },
        Op::Fsyncdir {
            fh: 1,
            datasync: false,
        },
        Op::Statfs { node: 1 },
        Op::Setxattr {
            node: 1,
            name: n.clone(),
            value: vec![],
            flags: 0,
        },
        Op::Getxattr {
            node: 1,
            name: n.clone(),
        },
        Op::Listxattr { node: 1 },
        Op::Removexattr {
            node: 1,
            name: n.clone(),
        },
        Op::Create {
            parent: 1,
            name: n,
            mode: 0,
            flags: 0,
            uid: 0,
            gid: 0,
        },
        Op::Fallocate {
            fh: 1,
            offset: 0,
            length: 1,
            mode: 0,
        },
        Op::Lseek {
            fh: 1,
            offset: 0,
            whence: SEEK_DATA,
        },
        Op::ReadFiles {
            nodes: vec![2, 3],
            max_size: 4096,
        },
        Op::ListDirs {
            nodes: vec![1, 4],
            max_entries: 64,
        },
        Op::Reserve { count: 16 },
        Op::CreateAs {
            parent: 1,
            name: b"f".to_vec(),
            mode: 0o644,
            flags: 2,
            uid: 0,
            gid: 0,
            node: 99,
            data: serde_bytes::ByteBuf::from(b"x".to_vec()),
        },
        Op::Batch {
            ops: vec![Timed {
                at: Timespec(1, 2),
                op: Op::Unlink {
                    parent: 1,
                    name: b"f".to_vec(),
                },
            }],
        },
    ]
}

#[test]
fn the_capability_table_is_op_required_cap() {
    let doc = doc();
    let rows = table(&section(&doc, "## 4. "), "capability");
    let caps: Vec<String> = rows.iter().map(|r| only_name(&r[0])).collect();
    assert_eq!(caps, CAPS, "§4 capabilities vs CAPS (same order)");
    // cap -> (opcodes, applies only with flags != 0)
    let mut needs: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for r in &rows {
        let cap = only_name(&r[0]);
        let conditional = r[1].contains("`flags` ≠ 0");
        for op in ticked(&r[1]) {
            if op == "flags" {
                continue;
            }
            assert!(Op::NAMES.contains(&op.as_str()), "§4: unknown opcode {op}");
            assert!(needs.insert(op, (cap.clone(), conditional)).is_none());
        }
    }
    let samples = samples();
    assert_eq!(
        samples.iter().map(Op::name).collect::<BTreeSet<_>>(),
        Op::NAMES.iter().copied().collect::<BTreeSet<_>>(),
        "a sample of every opcode"
    );
    for op in &samples {
        let want = match (needs.get(op.name()), op) {
            (None, _) => None,
            (Some((_, true)), Op::Rename { flags: 0, .. }) => None,
            (Some((cap, _)), _) => Some(cap.as_str()),
        };
        assert_eq!(op.required_cap(), want, "{op:?}");
    }
}

#[test]
fn the_errno_table_is_errno_table() {
    let doc = doc();
    let rows = table(&section(&doc, "### 6.1 "), "value");
    let documented: BTreeSet<(u32, String)> = rows
        .iter()
        .map(|r| (r[0].parse().expect("errno value"), r[1].clone()))
        .collect();
    let code: BTreeSet<(u32, String)> = Errno::TABLE
        .iter()
        .map(|(n, name, _)| (*n, name.to_string()))
        .collect();
    assert_eq!(documented, code, "§6.1 vs Errno::TABLE");
}

/// A number as the document writes it: from 10 000 on, groups of three digits split by
/// a space.
fn spaced(n: u64) -> String {
    let s = n.to_string();
    if n < 10_000 {
        return s;
    }
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && i % 3 == s.len() % 3 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[test]
fn the_limits_the_document_states_are_the_crates() {
    let doc = doc();
    let d = Limits::default();
    for (what, n) in [
        ("PRE_HELLO_MAX_FRAME", PRE_HELLO_MAX_FRAME as u64),
        ("MIN_MAX_FRAME", MIN_MAX_FRAME as u64),
        ("MAX_FRAME_CEILING", MAX_FRAME_CEILING as u64),
        ("MAX_IO_CEILING", MAX_IO_CEILING as u64),
        ("MAX_IN_FLIGHT_CEILING", MAX_IN_FLIGHT_CEILING as u64),
        ("FRAME_OVERHEAD", FRAME_OVERHEAD as u64),
        ("MIN_IO", MIN_IO as u64),
        ("default max_frame", d.max_frame as u64),
        ("default max_read", d.max_read as u64),
        ("default max_in_flight", d.max_in_flight as u64),
        ("MAX_XATTR_NAME", MAX_XATTR_NAME as u64),
        ("MAX_XATTR_VALUE", MAX_XATTR_VALUE as u64),
        ("MAX_XATTRS_PER_NODE", MAX_XATTRS_PER_NODE as u64),
        ("MAX_XATTR_TOTAL", MAX_XATTR_TOTAL as u64),
        ("MAX_SYMLINK_TARGET", MAX_SYMLINK_TARGET as u64),
        ("MAX_READDIR_ENTRIES", MAX_READDIR_ENTRIES as u64),
        ("MAX_BATCH_FORGET", MAX_BATCH_FORGET as u64),
        ("cbor::MAX_DEPTH", MAX_DEPTH as u64),
        ("cbor::MAX_ITEMS", MAX_ITEMS as u64),
        ("NSEC_PER_SEC", NSEC_PER_SEC as u64),
    ] {
        assert!(
            doc.contains(&spaced(n)),
            "{what} = {n} is not stated in docs/PROTOCOL.md"
        );
    }
    assert_eq!(d.max_write, d.max_read);
    assert_eq!(MIN_MAX_FRAME, FRAME_OVERHEAD + MIN_IO);
    assert_eq!(name::NAME_MAX, 255);
}
