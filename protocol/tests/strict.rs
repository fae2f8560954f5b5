//! The decoder's strictness (docs/PROTOCOL.md §3.1, §6.3): bodies breaking the encoding
//! rules are refused with the errno the spec gives, and the capability each op needs.

use hexz_protocol::*;

/// A hand-made CBOR writer, so that tests can write what the encoder never would.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn head(mut self, major: u8, v: u64) -> W {
        let m = major << 5;
        match v {
            0..=23 => self.0.push(m | v as u8),
            24..=0xff => self.0.extend([m | 24, v as u8]),
            0x100..=0xffff => {
                self.0.push(m | 25);
                self.0.extend((v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(m | 26);
                self.0.extend((v as u32).to_be_bytes());
            }
            _ => {
                self.0.push(m | 27);
                self.0.extend(v.to_be_bytes());
            }
        }
        self
    }
    fn u(self, v: u64) -> W {
        self.head(0, v)
    }
    fn t(mut self, s: &str) -> W {
        self = self.head(3, s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn b(mut self, s: &[u8]) -> W {
        self = self.head(2, s.len() as u64);
        self.0.extend(s);
        self
    }
    fn map(self, n: u64) -> W {
        self.head(5, n)
    }
    fn raw(mut self, b: &[u8]) -> W {
        self.0.extend(b);
        self
    }
}

/// `{"id": id, "op": {"statfs": {"node": <node bytes>}}}`
fn statfs_with_node(id: u64, node: &[u8]) -> Vec<u8> {
    W::default()
        .map(2)
        .t("id")
        .u(id)
        .t("op")
        .map(1)
        .t("statfs")
        .map(1)
        .t("node")
        .raw(node)
        .0
}

fn refused(body: &[u8]) -> (Option<u64>, Errno) {
    let bad = decode_request(body).unwrap_err();
    (bad.id, bad.errno)
}

#[test]
fn the_hand_writer_agrees_with_the_encoder() {
    let body = statfs_with_node(5, &[0x01]);
    assert_eq!(
        decode_request(&body).unwrap(),
        Request {
            id: 5,
            op: Op::Statfs { node: 1 }
        }
    );
}

#[test]
fn encoding_violations_after_the_id_are_einval_with_the_id() {
    let violations: &[(&str, &[u8])] = &[
        ("non-shortest integer", &[0x18, 0x01]),
        (
            "non-shortest 64-bit integer",
            &[0x1b, 0, 0, 0, 0, 0, 0, 0, 1],
        ),
        ("tagged integer", &[0xc2, 0x41, 0x01]),
        ("self-described CBOR tag", &[0xd9, 0xd9, 0xf7, 0x01]),
        ("half float", &[0xf9, 0x3c, 0x00]),
        ("double float", &[0xfb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0]),
        ("undefined", &[0xf7]),
        ("indefinite byte string", &[0x5f, 0x41, 0x01, 0xff]),
        ("indefinite array", &[0x9f, 0x01, 0xff]),
        ("reserved additional info", &[0x1c]),
    ];
    for (what, node) in violations {
        assert_eq!(
            refused(&statfs_with_node(5, node)),
            (Some(5), Errno::EINVAL),
            "{what}"
        );
    }
    // The same violations inside an unknown opcode: the encoding rules come first.
    let body = W::default()
        .map(2)
        .t("id")
        .u(6)
        .t("op")
        .map(1)
        .t("frobnicate")
        .raw(&[0xf9, 0x3c, 0x00])
        .0;
    assert_eq!(refused(&body), (Some(6), Errno::EINVAL));
    // Trailing bytes.
    let mut body = statfs_with_node(7, &[0x01]);
    body.push(0x00);
    assert_eq!(refused(&body), (Some(7), Errno::EINVAL));
    // An indefinite-length map of the op.
    let body = W::default()
        .map(2)
        .t("id")
        .u(8)
        .t("op")
        .raw(&[0xbf])
        .t("statfs")
        .map(1)
        .t("node")
        .u(1)
        .raw(&[0xff])
        .0;
    assert_eq!(refused(&body), (Some(8), Errno::EINVAL));
}

#[test]
fn a_violation_before_the_id_leaves_nothing_to_answer() {
    // {"op": {"statfs": {"node": 1.0}}, "id": 5}
    let body = W::default()
        .map(2)
        .t("op")
        .map(1)
        .t("statfs")
        .map(1)
        .t("node")
        .raw(&[0xf9, 0x3c, 0x00])
        .t("id")
        .u(5)
        .0;
    assert_eq!(refused(&body), (None, Errno::EBADMSG));
    // The id itself in a long form, or tagged.
    assert_eq!(
        refused(&W::default().map(1).t("id").raw(&[0x18, 0x05]).0),
        (None, Errno::EBADMSG)
    );
    assert_eq!(
        refused(&W::default().map(1).t("id").raw(&[0xc0, 0x05]).0),
        (None, Errno::EBADMSG)
    );
    // An indefinite-length top-level map.
    let mut body = vec![0xbf];
    body.extend(W::default().t("id").u(5).t("op").t("x").0);
    body.push(0xff);
    assert_eq!(refused(&body), (None, Errno::EBADMSG));
}

#[test]
fn well_formed_but_wrong_requests() {
    // Known opcode, missing field: EINVAL.
    let body = W::default()
        .map(2)
        .t("id")
        .u(1)
        .t("op")
        .map(1)
        .t("statfs")
        .map(0)
        .0;
    assert_eq!(refused(&body), (Some(1), Errno::EINVAL));
    // A key twice: EINVAL (it breaks an encoding rule), whether known or not.
    let body = W::default()
        .map(2)
        .t("id")
        .u(2)
        .t("op")
        .map(1)
        .t("statfs")
        .map(2)
        .t("node")
        .u(1)
        .t("node")
        .u(3)
        .0;
    assert_eq!(refused(&body), (Some(2), Errno::EINVAL));
    // A byte-string key: EINVAL.
    let body = W::default()
        .map(2)
        .t("id")
        .u(3)
        .t("op")
        .map(1)
        .t("statfs")
        .map(2)
        .t("node")
        .u(1)
        .b(b"x")
        .u(3)
        .0;
    assert_eq!(refused(&body), (Some(3), Errno::EINVAL));
    // Unknown opcode: ENOSYS.
    let body = W::default()
        .map(2)
        .t("id")
        .u(4)
        .t("op")
        .map(1)
        .t("chown_everything")
        .map(0)
        .0;
    assert_eq!(refused(&body), (Some(4), Errno::ENOSYS));
    // The op map with two opcodes: EINVAL.
    let body = W::default()
        .map(2)
        .t("id")
        .u(5)
        .t("op")
        .map(2)
        .t("statfs")
        .map(1)
        .t("node")
        .u(1)
        .t("readlink")
        .map(1)
        .t("node")
        .u(1)
        .0;
    assert_eq!(refused(&body), (Some(5), Errno::EINVAL));
    // "op" that is not a map of one entry: EINVAL, even when it reads like an opcode.
    let body = W::default().map(2).t("id").u(6).t("op").t("frobnicate").0;
    assert_eq!(refused(&body), (Some(6), Errno::EINVAL));
    let body = W::default().map(1).t("id").u(7).0;
    assert_eq!(refused(&body), (Some(7), Errno::EINVAL));
    // The id need not come first in a well-formed body.
    let body = W::default()
        .map(2)
        .t("op")
        .map(1)
        .t("frobnicate")
        .map(0)
        .t("id")
        .u(8)
        .0;
    assert_eq!(refused(&body), (Some(8), Errno::ENOSYS));
    // No id at all, or a negative one: nothing to answer.
    let body = W::default().map(1).t("op").map(1).t("x").map(0).0;
    assert_eq!(refused(&body), (None, Errno::EBADMSG));
    let body = W::default().map(1).t("id").raw(&[0x20]).0;
    assert_eq!(refused(&body), (None, Errno::EBADMSG));
}

#[test]
fn unknown_keys_are_ignored_and_null_means_absent() {
    // {"id": 9, "op": {"getattr": {"node": 3, "fh": null, "later": [h'00', {"k": true}]}},
    //  "trace": "x"}
    let body = W::default()
        .map(3)
        .t("id")
        .u(9)
        .t("op")
        .map(1)
        .t("getattr")
        .map(3)
        .t("node")
        .u(3)
        .t("fh")
        .raw(&[0xf6])
        .t("later")
        .raw(&[0x82])
        .b(&[0])
        .map(1)
        .t("k")
        .raw(&[0xf5])
        .t("trace")
        .t("x")
        .0;
    assert_eq!(
        decode_request(&body).unwrap(),
        Request {
            id: 9,
            op: Op::Getattr { node: 3, fh: None }
        }
    );
}

#[test]
fn claimed_lengths_larger_than_the_body_are_refused_without_allocating() {
    // {"id": 1, "op": {"write": {"fh": 1, "offset": 0, "data": <2^63 bytes claimed>}}}
    let body = W::default()
        .map(2)
        .t("id")
        .u(1)
        .t("op")
        .map(1)
        .t("write")
        .map(3)
        .t("fh")
        .u(1)
        .t("offset")
        .u(0)
        .t("data")
        .head(2, 1 << 63)
        .0;
    assert_eq!(refused(&body), (Some(1), Errno::EINVAL));
    // batch_forget claiming 2^32 items.
    let body = W::default()
        .map(2)
        .t("id")
        .u(2)
        .t("op")
        .map(1)
        .t("batch_forget")
        .map(1)
        .t("items")
        .head(4, 1 << 32)
        .0;
    assert_eq!(refused(&body), (Some(2), Errno::EINVAL));
}

#[test]
fn replies_obey_the_same_rules() {
    // {"id": 1, "r": {"ok": {}}} with the id in a long form.
    let body = W::default()
        .map(2)
        .t("id")
        .raw(&[0x18, 0x01])
        .t("r")
        .map(1)
        .t("ok")
        .map(0)
        .0;
    assert!(decode_reply(&body).is_err());
    let body = W::default()
        .map(2)
        .t("id")
        .u(1)
        .t("r")
        .map(1)
        .t("ok")
        .map(0)
        .0;
    assert_eq!(
        decode_reply(&body).unwrap(),
        Reply {
            id: 1,
            r: ReplyBody::ok()
        }
    );
}

#[test]
fn ops_needing_a_capability() {
    let cap = |op: Op| op.required_cap();
    assert_eq!(
        cap(Op::Readdirplus {
            fh: 1,
            cookie: 0,
            max_entries: 1
        }),
        Some("readdirplus")
    );
    assert_eq!(cap(Op::Listxattr { node: 1 }), Some("xattr"));
    for op in [
        Op::Getxattr {
            node: 1,
            name: b"user.a".to_vec(),
        },
        Op::Setxattr {
            node: 1,
            name: b"user.a".to_vec(),
            value: vec![],
            flags: 0,
        },
        Op::Removexattr {
            node: 1,
            name: b"user.a".to_vec(),
        },
    ] {
        assert_eq!(cap(op), Some("xattr"));
    }
    let rename = |flags| Op::Rename {
        parent: 1,
        name: b"a".to_vec(),
        new_parent: 1,
        new_name: b"b".to_vec(),
        flags,
    };
    assert_eq!(cap(rename(0)), None);
    assert_eq!(cap(rename(RENAME_NOREPLACE)), Some("rename2"));
    assert_eq!(cap(rename(RENAME_EXCHANGE)), Some("rename2"));
    assert_eq!(cap(rename(4)), Some("rename2"));
    assert_eq!(
        cap(Op::Lseek {
            fh: 1,
            offset: 0,
            whence: SEEK_DATA
        }),
        Some("lseek")
    );
    assert_eq!(
        cap(Op::Fallocate {
            fh: 1,
            offset: 0,
            length: 1,
            mode: 0
        }),
        Some("fallocate")
    );
    assert_eq!(
        cap(Op::Readdir {
            fh: 1,
            cookie: 0,
            max_entries: 1
        }),
        None
    );
    assert_eq!(cap(Op::Retain { items: vec![] }), None);
    assert_eq!(
        cap(Op::ReadFiles {
            nodes: vec![2],
            max_size: 1
        }),
        Some("read_files")
    );
    assert_eq!(
        cap(Op::ListDirs {
            nodes: vec![1],
            max_entries: 1
        }),
        Some("list_dirs")
    );
    assert_eq!(cap(Op::Reserve { count: 1 }), Some("write_behind"));
    assert_eq!(cap(Op::Batch { ops: vec![] }), Some("write_behind"));
    assert_eq!(
        CAPS,
        &[
            "readdirplus",
            "xattr",
            "rename2",
            "lseek",
            "fallocate",
            "read_files",
            "write_behind",
            "list_dirs"
        ]
    );
}
