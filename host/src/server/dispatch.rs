//! The one translation from protocol operations to VFS calls and back.

use std::collections::HashMap;
use std::sync::Mutex;

use hexz_protocol::hello::{MAX_BATCH_FORGET, MAX_READDIR_ENTRIES};
use hexz_protocol::{Attr, DirEntry, DirEntryPlus, Entry, Errno, Limits, Op, ReplyBody};
use serde_bytes::ByteBuf;

use crate::vfs::{SetAttr, Vfs, VfsResult};

/// What one connection has agreed and who it is, as dispatch needs it.
pub struct Session {
    pub owner: u64,
    pub limits: Limits,
    pub ttl_ms: u32,
    /// Node references this connection holds (one per entry handed out, less forgets).
    refs: Mutex<HashMap<u64, u64>>,
}

impl Session {
    pub fn new(owner: u64, limits: Limits, ttl_ms: u32) -> Session {
        Session {
            owner,
            limits,
            ttl_ms,
            refs: Mutex::new(HashMap::new()),
        }
    }

    fn refs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.refs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plain_entry(&self, attr: Attr) -> Entry {
        Entry {
            node: attr.ino,
            generation: 0,
            attr,
            entry_ttl_ms: self.ttl_ms,
            attr_ttl_ms: self.ttl_ms,
        }
    }

    /// An entry handed to the client: it holds a reference to the node until it forgets it.
    fn entry(&self, vfs: &Vfs, attr: Attr) -> Entry {
        *self.refs().entry(attr.ino).or_default() += 1;
        vfs.pin(attr.ino, 1);
        self.plain_entry(attr)
    }

    fn forget(&self, vfs: &Vfs, node: u64, n: u64) {
        let released = {
            let mut refs = self.refs();
            let Some(held) = refs.get_mut(&node) else {
                return;
            };
            let k = n.min(*held);
            *held -= k;
            if *held == 0 {
                refs.remove(&node);
            }
            k
        };
        if released > 0 {
            vfs.unpin(node, released);
        }
    }

    /// Drops every reference this connection still holds (it went away).
    pub fn release_refs(&self, vfs: &Vfs) -> usize {
        let refs: Vec<(u64, u64)> = self.refs().drain().collect();
        for &(node, n) in &refs {
            vfs.unpin(node, n);
        }
        refs.len()
    }

    fn attr(&self, attr: Attr) -> ReplyBody {
        ReplyBody::Attr {
            attr,
            attr_ttl_ms: self.ttl_ms,
        }
    }
}

fn reply<T>(r: VfsResult<T>, f: impl FnOnce(T) -> ReplyBody) -> ReplyBody {
    match r {
        Ok(v) => f(v),
        Err(e) => ReplyBody::Err(e),
    }
}

fn ok(r: VfsResult<()>) -> ReplyBody {
    reply(r, |_| ReplyBody::Ok {})
}

/// Answers `op` if it can be answered from memory without waiting for a disk; `None`
/// means it must go to a worker.
pub fn dispatch_inline(vfs: &Vfs, s: &Session, op: &Op) -> Option<ReplyBody> {
    match op {
        Op::Lookup { .. }
        | Op::Forget { .. }
        | Op::BatchForget { .. }
        | Op::Getattr { .. }
        | Op::Readlink { .. }
        | Op::Getxattr { .. }
        | Op::Listxattr { .. }
        | Op::Opendir { .. }
        | Op::Readdir { .. }
        | Op::Readdirplus { .. }
        | Op::Hello(_) => Some(dispatch(vfs, s, op.clone())),
        Op::Read { fh, offset, size } if *size <= s.limits.max_read => vfs
            .read_cached(*fh, *offset, *size)
            .map(|r| reply(r, ReplyBody::Data)),
        _ => None,
    }
}

/// Executes one request (already past hello) against the VFS.
pub fn dispatch(vfs: &Vfs, s: &Session, op: Op) -> ReplyBody {
    match op {
        Op::Hello(_) => ReplyBody::Err(Errno::EPROTO),
        Op::Lookup { parent, name } => reply(vfs.lookup(parent, &name), |a| {
            ReplyBody::Entry(s.entry(vfs, a))
        }),
        Op::Forget { node, nlookup } => {
            s.forget(vfs, node, nlookup);
            ReplyBody::Ok {}
        }
        Op::BatchForget { items } if items.len() > MAX_BATCH_FORGET => {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::BatchForget { items } => {
            for (node, n) in items {
                s.forget(vfs, node, n);
            }
            ReplyBody::Ok {}
        }
        Op::Retain { items } if items.len() > MAX_BATCH_FORGET => ReplyBody::Err(Errno::EINVAL),
        Op::Retain { items } => {
            for (node, n) in items {
                if let Ok(a) = vfs.getattr(node) {
                    for _ in 0..n.min(1 << 20) {
                        s.entry(vfs, a.clone());
                    }
                }
            }
            ReplyBody::Ok {}
        }
        Op::Getattr { node, .. } => reply(vfs.getattr(node), |a| s.attr(a)),
        Op::Setattr {
            node,
            fh: _,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } => {
            let set = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            };
            reply(vfs.setattr(node, set), |a| s.attr(a))
        }
        Op::Readlink { node } => reply(vfs.readlink(node), ReplyBody::Data),
        Op::Symlink {
            parent,
            name,
            target,
            uid,
            gid,
        } => reply(vfs.symlink(parent, &name, &target, uid, gid), |a| {
            ReplyBody::Entry(s.entry(vfs, a))
        }),
        Op::Mknod {
            parent,
            name,
            mode,
            rdev,
            uid,
            gid,
        } => reply(vfs.mknod(parent, &name, mode, rdev, uid, gid), |a| {
            ReplyBody::Entry(s.entry(vfs, a))
        }),
        Op::Mkdir {
            parent,
            name,
            mode,
            uid,
            gid,
        } => reply(vfs.mkdir(parent, &name, mode, uid, gid), |a| {
            ReplyBody::Entry(s.entry(vfs, a))
        }),
        Op::Unlink { parent, name } => ok(vfs.unlink(parent, &name)),
        Op::Rmdir { parent, name } => ok(vfs.rmdir(parent, &name)),
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => ok(vfs.rename(parent, &name, new_parent, &new_name, flags)),
        Op::Link {
            node,
            new_parent,
            new_name,
        } => reply(vfs.link(node, new_parent, &new_name), |a| {
            ReplyBody::Entry(s.entry(vfs, a))
        }),
        Op::Open { node, flags } => reply(vfs.open(node, flags, s.owner), |fh| ReplyBody::Opened {
            fh,
            keep_cache: true,
        }),
        Op::Read { size, .. } if size > s.limits.max_read => ReplyBody::Err(Errno::EINVAL),
        Op::Read { fh, offset, size } => reply(vfs.read(fh, offset, size), ReplyBody::Data),
        Op::Write { data, .. } if data.len() > s.limits.max_write as usize => {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::Write { fh, offset, data } => reply(vfs.write(fh, offset, &data), |size| {
            ReplyBody::Written { size }
        }),
        Op::Flush { fh, .. } => ok(vfs.flush(fh)),
        Op::Release { fh } | Op::Releasedir { fh } => ok(vfs.release(fh)),
        Op::Fsync { fh, datasync } => ok(vfs.fsync(fh, datasync)),
        Op::Opendir { node } => reply(vfs.opendir(node, s.owner), |fh| ReplyBody::Opened {
            fh,
            keep_cache: true,
        }),
        Op::Readdir { max_entries, .. } | Op::Readdirplus { max_entries, .. }
            if max_entries == 0 || max_entries > MAX_READDIR_ENTRIES =>
        {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::Readdir {
            fh,
            cookie,
            max_entries,
        } => readdir(vfs, s, fh, cookie, max_entries, false),
        Op::Readdirplus {
            fh,
            cookie,
            max_entries,
        } => readdir(vfs, s, fh, cookie, max_entries, true),
        Op::Fsyncdir { fh, .. } => ok(vfs.fsyncdir(fh)),
        Op::Statfs { .. } => reply(vfs.statfs(), ReplyBody::Statfs),
        Op::Setxattr {
            node,
            name,
            value,
            flags,
        } => ok(vfs.setxattr(node, &name, &value, flags)),
        Op::Getxattr { node, name } => reply(vfs.getxattr(node, &name), ReplyBody::Data),
        Op::Listxattr { node } => reply(vfs.listxattr(node), |names| ReplyBody::Names {
            names: names.into_iter().map(ByteBuf::from).collect(),
        }),
        Op::Removexattr { node, name } => ok(vfs.removexattr(node, &name)),
        Op::Create {
            parent,
            name,
            mode,
            flags,
            uid,
            gid,
        } => reply(
            vfs.create(parent, &name, mode, flags, uid, gid, s.owner),
            |(a, fh)| ReplyBody::Created {
                entry: s.entry(vfs, a),
                fh,
            },
        ),
        Op::Fallocate {
            fh,
            offset,
            length,
            mode,
        } => ok(vfs.fallocate(fh, offset, length, mode)),
        Op::Lseek { fh, offset, whence } => reply(vfs.lseek(fh, offset, whence), |offset| {
            ReplyBody::Offset { offset }
        }),
    }
}

/// A page of entries that fits the negotiated frame.
fn readdir(vfs: &Vfs, s: &Session, fh: u64, cookie: u64, max: u32, plus: bool) -> ReplyBody {
    let items = match vfs.readdir(fh, cookie, max) {
        Ok(i) => i,
        Err(e) => return ReplyBody::Err(e),
    };
    let budget = s.limits.max_frame as usize - 1024;
    let per_entry = if plus { 220 } else { 48 };
    let mut used = 0usize;
    let mut n = 0;
    for it in &items {
        used += it.name.len() + per_entry;
        if used > budget {
            break;
        }
        n += 1;
    }
    let eof = n == items.len() && items.len() < max as usize;
    let items = &items[..n];
    if !plus {
        return ReplyBody::Dir {
            entries: items
                .iter()
                .map(|i| DirEntry {
                    name: i.name.clone(),
                    ino: i.node,
                    kind: i.kind,
                    cookie: i.cookie,
                })
                .collect(),
            eof,
        };
    }
    let ids: Vec<u64> = items.iter().map(|i| i.node).collect();
    let attrs = vfs.attr_many(&ids);
    let entries = items
        .iter()
        .zip(attrs)
        .filter_map(|(i, a)| {
            a.ok().map(|attr| {
                // "." and ".." take no reference (as in FUSE).
                let entry = if i.name == b"." || i.name == b".." {
                    s.plain_entry(attr)
                } else {
                    s.entry(vfs, attr)
                };
                DirEntryPlus {
                    name: i.name.clone(),
                    cookie: i.cookie,
                    entry,
                }
            })
        })
        .collect();
    ReplyBody::DirPlus { entries, eof }
}
