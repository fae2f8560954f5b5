//! proptest strategies producing every message type of the protocol.
#![allow(dead_code)]

use hexz_protocol::*;
use proptest::prelude::*;
use proptest::strategy::Union;
use serde_bytes::ByteBuf;

pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn ts() -> impl Strategy<Value = Timespec> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Timespec(s, n))
}

fn set_time() -> impl Strategy<Value = SetTime> {
    prop_oneof![Just(SetTime::Now), ts().prop_map(SetTime::At)]
}

pub fn attr() -> impl Strategy<Value = Attr> {
    (
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u32>(), ts(), ts(), ts()),
    )
        .prop_map(
            |((ino, mode, nlink, uid, gid, rdev), (size, blocks, blksize, atime, mtime, ctime))| {
                Attr {
                    ino,
                    mode,
                    nlink,
                    uid,
                    gid,
                    rdev,
                    size,
                    blocks,
                    blksize,
                    atime,
                    mtime,
                    ctime,
                }
            },
        )
}

pub fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<u64>(),
        attr(),
        any::<u32>(),
        any::<u32>(),
        prop::option::of(attr()),
    )
        .prop_map(
            |(node, generation, attr, entry_ttl_ms, attr_ttl_ms, dir_attr)| Entry {
                node,
                generation,
                attr,
                entry_ttl_ms,
                attr_ttl_ms,
                dir_attr,
            },
        )
}

fn dir_entry_plus() -> impl Strategy<Value = DirEntryPlus> {
    (bytes(40), any::<u64>(), entry()).prop_map(|(name, cookie, entry)| DirEntryPlus {
        name,
        cookie,
        entry,
    })
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        prop::collection::vec(any::<u32>(), 0..4),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        prop::collection::vec("[a-z_]{0,12}", 0..4),
        ".{0,20}",
    )
        .prop_map(
            |(versions, (max_frame, max_read, max_write, max_in_flight), caps, client)| Hello {
                versions,
                max_frame,
                max_read,
                max_write,
                max_in_flight,
                caps,
                client,
            },
        )
}

pub fn op() -> impl Strategy<Value = Op> {
    let n = || any::<u64>();
    let name = || bytes(300);
    let o = || prop::option::of(any::<u32>());
    Union::new(vec![
        hello().prop_map(Op::Hello).boxed(),
        (n(), name())
            .prop_map(|(parent, name)| Op::Lookup { parent, name })
            .boxed(),
        (n(), n())
            .prop_map(|(node, nlookup)| Op::Forget { node, nlookup })
            .boxed(),
        prop::collection::vec((n(), n()), 0..20)
            .prop_map(|items| Op::BatchForget { items })
            .boxed(),
        prop::collection::vec((n(), n()), 0..20)
            .prop_map(|items| Op::Retain { items })
            .boxed(),
        (n(), prop::option::of(n()))
            .prop_map(|(node, fh)| Op::Getattr { node, fh })
            .boxed(),
        (
            (n(), prop::option::of(n()), o(), o(), o()),
            (
                prop::option::of(n()),
                prop::option::of(set_time()),
                prop::option::of(set_time()),
            ),
        )
            .prop_map(
                |((node, fh, mode, uid, gid), (size, atime, mtime))| Op::Setattr {
                    node,
                    fh,
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                },
            )
            .boxed(),
        n().prop_map(|node| Op::Readlink { node }).boxed(),
        (n(), name(), bytes(100), any::<u32>(), any::<u32>())
            .prop_map(|(parent, name, target, uid, gid)| Op::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            })
            .boxed(),
        (n(), name(), any::<u32>(), n(), any::<u32>(), any::<u32>())
            .prop_map(|(parent, name, mode, rdev, uid, gid)| Op::Mknod {
                parent,
                name,
                mode,
                rdev,
                uid,
                gid,
            })
            .boxed(),
        (n(), name(), any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(parent, name, mode, uid, gid)| Op::Mkdir {
                parent,
                name,
                mode,
                uid,
                gid,
            })
            .boxed(),
        (n(), name())
            .prop_map(|(parent, name)| Op::Unlink { parent, name })
            .boxed(),
        (n(), name())
            .prop_map(|(parent, name)| Op::Rmdir { parent, name })
            .boxed(),
        (n(), name(), n(), name(), any::<u32>())
            .prop_map(|(parent, name, new_parent, new_name, flags)| Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            })
            .boxed(),
        (n(), n(), name())
            .prop_map(|(node, new_parent, new_name)| Op::Link {
                node,
                new_parent,
                new_name,
            })
            .boxed(),
        (n(), any::<u32>(), prop::option::of((n(), any::<u32>())))
            .prop_map(|(node, flags, read)| Op::Open {
                node,
                flags,
                read: read.map(|(offset, size)| ReadAt { offset, size }),
            })
            .boxed(),
        (n(), n(), any::<u32>())
            .prop_map(|(fh, offset, size)| Op::Read { fh, offset, size })
            .boxed(),
        (n(), n(), bytes(5000))
            .prop_map(|(fh, offset, data)| Op::Write { fh, offset, data })
            .boxed(),
        (n(), n())
            .prop_map(|(fh, lock_owner)| Op::Flush { fh, lock_owner })
            .boxed(),
        n().prop_map(|fh| Op::Release { fh }).boxed(),
        (n(), any::<bool>())
            .prop_map(|(fh, datasync)| Op::Fsync { fh, datasync })
            .boxed(),
        (n(), prop::option::of(any::<u32>()))
            .prop_map(|(node, list)| Op::Opendir { node, list })
            .boxed(),
        (n(), n(), any::<u32>())
            .prop_map(|(fh, cookie, max_entries)| Op::Readdir {
                fh,
                cookie,
                max_entries,
            })
            .boxed(),
        (n(), n(), any::<u32>())
            .prop_map(|(fh, cookie, max_entries)| Op::Readdirplus {
                fh,
                cookie,
                max_entries,
            })
            .boxed(),
        n().prop_map(|fh| Op::Releasedir { fh }).boxed(),
        (n(), any::<bool>())
            .prop_map(|(fh, datasync)| Op::Fsyncdir { fh, datasync })
            .boxed(),
        n().prop_map(|node| Op::Statfs { node }).boxed(),
        (n(), name(), bytes(300), any::<u32>())
            .prop_map(|(node, name, value, flags)| Op::Setxattr {
                node,
                name,
                value,
                flags,
            })
            .boxed(),
        (n(), name())
            .prop_map(|(node, name)| Op::Getxattr { node, name })
            .boxed(),
        n().prop_map(|node| Op::Listxattr { node }).boxed(),
        (n(), name())
            .prop_map(|(node, name)| Op::Removexattr { node, name })
            .boxed(),
        (
            n(),
            name(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(parent, name, mode, flags, uid, gid)| Op::Create {
                parent,
                name,
                mode,
                flags,
                uid,
                gid,
            })
            .boxed(),
        (n(), n(), n(), any::<u32>())
            .prop_map(|(fh, offset, length, mode)| Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            })
            .boxed(),
        (n(), n(), any::<u32>())
            .prop_map(|(fh, offset, whence)| Op::Lseek { fh, offset, whence })
            .boxed(),
        (prop::collection::vec(n(), 0..6), any::<u32>())
            .prop_map(|(nodes, max_size)| Op::ReadFiles { nodes, max_size })
            .boxed(),
        (prop::collection::vec(n(), 0..6), any::<u32>())
            .prop_map(|(nodes, max_entries)| Op::ListDirs { nodes, max_entries })
            .boxed(),
        any::<u32>().prop_map(|count| Op::Reserve { count }).boxed(),
        (
            (n(), name(), any::<u32>(), any::<u32>()),
            (any::<u32>(), any::<u32>(), n(), bytes(30)),
        )
            .prop_map(
                |((parent, name, mode, flags), (uid, gid, node, data))| Op::CreateAs {
                    parent,
                    name,
                    mode,
                    flags,
                    uid,
                    gid,
                    node,
                    data: serde_bytes::ByteBuf::from(data),
                },
            )
            .boxed(),
        prop::collection::vec((ts(), n(), name()), 0..4)
            .prop_map(|items| Op::Batch {
                ops: items
                    .into_iter()
                    .map(|(at, parent, name)| Timed {
                        at,
                        op: Op::Unlink { parent, name },
                    })
                    .collect(),
            })
            .boxed(),
    ])
}

pub fn reply_body() -> impl Strategy<Value = ReplyBody> {
    let n = || any::<u64>();
    Union::new(vec![
        any::<u32>().prop_map(|e| ReplyBody::Err(Errno(e))).boxed(),
        Just(ReplyBody::ok()).boxed(),
        (attr(), any::<u32>())
            .prop_map(|(a, t)| ReplyBody::Ok {
                dir_attr: Some(a),
                attr_ttl_ms: Some(t),
            })
            .boxed(),
        (
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
            ),
            prop::collection::vec("[a-z]{0,10}", 0..4),
            n(),
            bytes(40),
            ".{0,10}",
        )
            .prop_map(
                |(
                    (version, max_frame, max_read, max_write, max_in_flight),
                    caps,
                    root,
                    fs_id,
                    server,
                )| {
                    ReplyBody::Hello(HelloReply {
                        version,
                        max_frame,
                        max_read,
                        max_write,
                        max_in_flight,
                        caps,
                        root,
                        fs_id,
                        server,
                    })
                },
            )
            .boxed(),
        entry().prop_map(ReplyBody::Entry).boxed(),
        (attr(), any::<u32>())
            .prop_map(|(attr, attr_ttl_ms)| ReplyBody::Attr { attr, attr_ttl_ms })
            .boxed(),
        (
            n(),
            any::<bool>(),
            prop::option::of(bytes(64)),
            prop::option::of(
                (prop::collection::vec(dir_entry_plus(), 0..3), any::<bool>())
                    .prop_map(|(entries, eof)| DirList { entries, eof }),
            ),
        )
            .prop_map(|(fh, keep_cache, data, list)| ReplyBody::Opened {
                fh,
                keep_cache,
                data: data.map(ByteBuf::from),
                list,
            })
            .boxed(),
        (entry(), n())
            .prop_map(|(entry, fh)| ReplyBody::Created { entry, fh })
            .boxed(),
        bytes(5000).prop_map(ReplyBody::Data).boxed(),
        (
            any::<u32>(),
            prop::option::of(attr()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(size, attr, attr_ttl_ms)| ReplyBody::Written {
                size,
                attr,
                attr_ttl_ms,
            })
            .boxed(),
        (
            prop::collection::vec(
                (bytes(40), n(), any::<u32>(), n()).prop_map(|(name, ino, kind, cookie)| {
                    DirEntry {
                        name,
                        ino,
                        kind,
                        cookie,
                    }
                }),
                0..10,
            ),
            any::<bool>(),
        )
            .prop_map(|(entries, eof)| ReplyBody::Dir { entries, eof })
            .boxed(),
        (prop::collection::vec(dir_entry_plus(), 0..5), any::<bool>())
            .prop_map(|(entries, eof)| ReplyBody::DirPlus { entries, eof })
            .boxed(),
        (
            (n(), n(), n(), n(), n()),
            (any::<u32>(), any::<u32>(), any::<u32>()),
        )
            .prop_map(
                |((blocks, bfree, bavail, files, ffree), (bsize, frsize, namelen))| {
                    ReplyBody::Statfs(Statfs {
                        blocks,
                        bfree,
                        bavail,
                        files,
                        ffree,
                        bsize,
                        frsize,
                        namelen,
                    })
                },
            )
            .boxed(),
        prop::collection::vec(bytes(30).prop_map(serde_bytes::ByteBuf::from), 0..6)
            .prop_map(|names| ReplyBody::Names { names })
            .boxed(),
        n().prop_map(|offset| ReplyBody::Offset { offset }).boxed(),
        prop::collection::vec((n(), bytes(30)), 0..6)
            .prop_map(|files| ReplyBody::Files {
                files: files
                    .into_iter()
                    .map(|(node, data)| FileData {
                        node,
                        data: serde_bytes::ByteBuf::from(data),
                    })
                    .collect(),
            })
            .boxed(),
        prop::collection::vec(
            (
                n(),
                prop::option::of(prop::collection::vec(dir_entry_plus(), 0..3)),
            ),
            0..4,
        )
        .prop_map(|dirs| ReplyBody::Listings {
            dirs: dirs
                .into_iter()
                .map(|(node, entries)| DirListing { node, entries })
                .collect(),
        })
        .boxed(),
        (n(), any::<u32>())
            .prop_map(|(first, count)| ReplyBody::Reserved { first, count })
            .boxed(),
        prop::collection::vec(any::<u32>(), 0..4)
            .prop_map(|errs| ReplyBody::Batch {
                replies: errs.into_iter().map(|e| ReplyBody::Err(Errno(e))).collect(),
            })
            .boxed(),
    ])
}
