//! The example frames in docs/PROTOCOL.md are checked byte for byte: each decodes to the
//! message built here, and re-encodes to exactly the bytes in the document.

use hexz_protocol::frame::PREFIX_LEN;
use hexz_protocol::*;

enum Msg {
    Req(Request),
    Rep(Reply),
}

fn attr() -> Attr {
    Attr {
        ino: 2,
        mode: 0o100644,
        nlink: 1,
        uid: 1000,
        gid: 1000,
        rdev: 0,
        size: 12,
        blocks: 8,
        blksize: 4096,
        atime: Timespec(1_700_000_000, 0),
        mtime: Timespec(1_700_000_000, 5),
        ctime: Timespec(1_700_000_000, 5),
    }
}

fn examples() -> Vec<(&'static str, Msg)> {
    // The root directory, as `.` and `..` of itself: no subdirectories, size 0.
    let root_entry = Entry {
        node: 1,
        generation: 0,
        attr: Attr {
            ino: 1,
            mode: 0o40755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: 0,
            blocks: 8,
            ..attr()
        },
        entry_ttl_ms: 60_000,
        attr_ttl_ms: 60_000,
        dir_attr: None,
    };
    let entry = Entry {
        node: 2,
        generation: 0,
        attr: attr(),
        entry_ttl_ms: 60_000,
        attr_ttl_ms: 60_000,
        dir_attr: None,
    };
    vec![
        (
            "hello-request",
            Msg::Req(Request {
                id: 1,
                op: Op::Hello(Hello {
                    versions: vec![1],
                    max_frame: 1_114_112,
                    max_read: 1_048_576,
                    max_write: 1_048_576,
                    max_in_flight: 64,
                    caps: vec!["readdirplus".into()],
                    client: "guest".into(),
                }),
            }),
        ),
        (
            "hello-reply",
            Msg::Rep(Reply {
                id: 1,
                r: ReplyBody::Hello(HelloReply {
                    version: 1,
                    max_frame: 1_114_112,
                    max_read: 1_048_576,
                    max_write: 1_048_576,
                    max_in_flight: 64,
                    caps: vec!["readdirplus".into()],
                    root: 1,
                    fs_id: vec![0xab, 0xcd],
                    server: "hexz".into(),
                }),
            }),
        ),
        (
            "lookup-request",
            Msg::Req(Request {
                id: 2,
                op: Op::Lookup {
                    parent: 1,
                    name: b"a.txt".to_vec(),
                },
            }),
        ),
        (
            "entry-reply",
            Msg::Rep(Reply {
                id: 2,
                r: ReplyBody::Entry(entry),
            }),
        ),
        (
            "lookup-enoent-reply",
            Msg::Rep(Reply {
                id: 2,
                r: ReplyBody::Err(Errno::ENOENT),
            }),
        ),
        (
            "open-request",
            Msg::Req(Request {
                id: 3,
                op: Op::Open {
                    node: 2,
                    flags: 0,
                    read: None,
                },
            }),
        ),
        (
            "opened-reply",
            Msg::Rep(Reply {
                id: 3,
                r: ReplyBody::Opened {
                    fh: 7,
                    keep_cache: true,
                    data: None,
                    list: None,
                },
            }),
        ),
        (
            "read-request",
            Msg::Req(Request {
                id: 4,
                op: Op::Read {
                    fh: 7,
                    offset: 0,
                    size: 4096,
                },
            }),
        ),
        (
            "data-reply",
            Msg::Rep(Reply {
                id: 4,
                r: ReplyBody::Data(b"hello, hexz\n".to_vec()),
            }),
        ),
        (
            "setattr-truncate-request",
            Msg::Req(Request {
                id: 5,
                op: Op::Setattr {
                    node: 2,
                    fh: None,
                    mode: None,
                    uid: None,
                    gid: None,
                    size: Some(0),
                    atime: None,
                    mtime: Some(SetTime::Now),
                },
            }),
        ),
        (
            "rename-noreplace-request",
            Msg::Req(Request {
                id: 6,
                op: Op::Rename {
                    parent: 1,
                    name: b"a".to_vec(),
                    new_parent: 1,
                    new_name: b"b".to_vec(),
                    flags: message::RENAME_NOREPLACE,
                },
            }),
        ),
        (
            "ok-reply",
            Msg::Rep(Reply {
                id: 6,
                r: ReplyBody::ok(),
            }),
        ),
        (
            "readdirplus-request",
            Msg::Req(Request {
                id: 8,
                op: Op::Readdirplus {
                    fh: 9,
                    cookie: 0,
                    max_entries: 128,
                },
            }),
        ),
        (
            "dir_plus-reply",
            Msg::Rep(Reply {
                id: 8,
                r: ReplyBody::DirPlus {
                    entries: vec![
                        DirEntryPlus {
                            name: b".".to_vec(),
                            cookie: 1,
                            entry: root_entry,
                        },
                        DirEntryPlus {
                            name: b"..".to_vec(),
                            cookie: 2,
                            entry: root_entry,
                        },
                        DirEntryPlus {
                            name: b"a.txt".to_vec(),
                            cookie: 3,
                            entry,
                        },
                    ],
                    eof: true,
                },
            }),
        ),
        (
            "retain-request",
            Msg::Req(Request {
                id: 10,
                op: Op::Retain {
                    items: vec![(2, 1), (5, 3)],
                },
            }),
        ),
        (
            "einval-reply",
            Msg::Rep(Reply {
                id: 10,
                r: ReplyBody::Err(Errno::EINVAL),
            }),
        ),
    ]
}

fn encode(m: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Msg::Req(r) => encode_frame(r, 1 << 20, &mut out),
        Msg::Rep(r) => encode_frame(r, 1 << 20, &mut out),
    }
    .unwrap();
    out
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|l| {
            l.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `<!-- golden: NAME -->` followed by a ```hex block.
fn vectors_in_spec() -> Vec<(String, Vec<u8>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- golden: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next().map(str::trim),
            Some("```hex"),
            "golden {name}: no hex block follows"
        );
        let mut bytes = Vec::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            for tok in l.split_whitespace() {
                bytes.push(
                    u8::from_str_radix(tok, 16)
                        .unwrap_or_else(|_| panic!("golden {name}: bad hex {tok}")),
                );
            }
        }
        out.push((name.to_string(), bytes));
    }
    out
}

#[test]
fn spec_examples_decode_and_reencode_byte_for_byte() {
    let spec = vectors_in_spec();
    let examples = examples();
    assert_eq!(
        spec.len(),
        examples.len(),
        "spec has {} golden frames, tests know {}",
        spec.len(),
        examples.len()
    );
    for (name, msg) in &examples {
        let (_, bytes) = spec
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("spec lacks golden {name}"));
        let len = u32::from_be_bytes(bytes[..PREFIX_LEN].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - PREFIX_LEN, "{name}: length prefix");
        let body = &bytes[PREFIX_LEN..];
        let reencoded = match msg {
            Msg::Req(want) => {
                let got = decode_request(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&got, want, "{name}");
                encode(&Msg::Req(got))
            }
            Msg::Rep(want) => {
                let got = decode_reply(body).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&got, want, "{name}");
                encode(&Msg::Rep(got))
            }
        };
        assert_eq!(&reencoded, bytes, "{name}: re-encoding differs");
    }
}

/// Prints the vectors for the spec: `cargo test -p hexz-protocol --test golden -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_golden_vectors() {
    for (name, msg) in examples() {
        println!(
            "<!-- golden: {name} -->\n```hex\n{}\n```\n",
            hex(&encode(&msg))
        );
    }
}
