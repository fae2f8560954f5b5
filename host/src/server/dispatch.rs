//! The one translation from protocol operations to VFS calls and back.

use hexz_protocol::hello::{MAX_BATCH_FORGET, MAX_READDIR_ENTRIES};
use hexz_protocol::{
    Attr, DirEntry, DirEntryPlus, DirList, DirListing, Entry, Errno, FileData, Limits, Op,
    ReplyBody, Timed, MAX_BATCH, MAX_LIST_DIRS, MAX_READ_FILES, MAX_RESERVE, MAX_RESERVED,
};
use serde_bytes::ByteBuf;

use crate::vfs::{DirItem, SetAttr, Vfs, VfsResult};

/// What one connection has agreed and who it is, as dispatch needs it. Handles and node
/// references belong to `owner` in the VFS core.
pub struct Session {
    pub owner: u64,
    pub limits: Limits,
    pub ttl_ms: u32,
    /// Capabilities agreed in hello; ops needing another one get ENOSYS.
    pub caps: Vec<String>,
    /// Node ids `reserve` set aside for this connection and no `create_as` used yet.
    reserved: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Session {
    pub fn new(owner: u64, limits: Limits, ttl_ms: u32, caps: Vec<String>) -> Session {
        Session {
            owner,
            limits,
            ttl_ms,
            caps,
            reserved: Default::default(),
        }
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, attr: Attr) -> Entry {
        Entry {
            node: attr.ino,
            generation: 0,
            attr,
            entry_ttl_ms: self.ttl_ms,
            attr_ttl_ms: self.ttl_ms,
            dir_attr: None,
        }
    }

    /// The entry of a name just added to `dir`, with the directory's new attributes (so
    /// the client need not ask for them).
    fn new_entry(&self, vfs: &Vfs, dir: u64, attr: Attr) -> Entry {
        Entry {
            dir_attr: vfs.getattr(self.owner, dir, None).ok(),
            ..self.entry(attr)
        }
    }

    fn attr(&self, attr: Attr) -> ReplyBody {
        ReplyBody::Attr {
            attr,
            attr_ttl_ms: self.ttl_ms,
        }
    }

    fn allows(&self, op: &Op) -> bool {
        op.required_cap()
            .is_none_or(|c| self.caps.iter().any(|h| h == c))
    }
}

fn reply<T>(r: VfsResult<T>, f: impl FnOnce(T) -> ReplyBody) -> ReplyBody {
    match r {
        Ok(v) => f(v),
        Err(e) => ReplyBody::Err(e),
    }
}

fn ok(r: VfsResult<()>) -> ReplyBody {
    reply(r, |_| ReplyBody::ok())
}

/// The reply to a removal from `dir`: `ok` with the directory's new attributes.
fn removed(vfs: &Vfs, s: &Session, dir: u64, r: VfsResult<()>) -> ReplyBody {
    match r {
        Ok(()) => {
            let dir_attr = vfs.getattr(s.owner, dir, None).ok();
            ReplyBody::Ok {
                dir_attr,
                attr_ttl_ms: dir_attr.map(|_| s.ttl_ms),
            }
        }
        Err(e) => ReplyBody::Err(e),
    }
}

/// Answers `op` if it can be answered from memory without waiting for a disk; `None`
/// means it must go to a worker.
pub fn dispatch_inline(vfs: &Vfs, s: &Session, op: &Op) -> Option<ReplyBody> {
    match op {
        Op::Lookup { .. }
        | Op::Forget { .. }
        | Op::BatchForget { .. }
        | Op::Retain { .. }
        | Op::Getattr { .. }
        | Op::Readlink { .. }
        | Op::Getxattr { .. }
        | Op::Listxattr { .. }
        | Op::Opendir { .. }
        | Op::Readdir { .. }
        | Op::Readdirplus { .. }
        | Op::ListDirs { .. }
        | Op::Hello(_) => Some(dispatch(vfs, s, op.clone())),
        Op::Read { fh, offset, size } if *size <= s.limits.max_read => vfs
            .read_cached(s.owner, *fh, *offset, *size)
            .map(|r| reply(r, ReplyBody::Data)),
        _ => None,
    }
}

/// Executes one request (already past hello) against the VFS.
pub fn dispatch(vfs: &Vfs, s: &Session, op: Op) -> ReplyBody {
    if !s.allows(&op) {
        return ReplyBody::Err(Errno::ENOSYS);
    }
    let o = s.owner;
    match op {
        Op::Hello(_) => ReplyBody::Err(Errno::EPROTO),
        Op::Lookup { parent, name } => reply(vfs.lookup(o, parent, &name), |a| {
            ReplyBody::Entry(s.entry(a))
        }),
        Op::Forget { node, nlookup } => {
            vfs.forget(o, node, nlookup);
            ReplyBody::ok()
        }
        Op::BatchForget { items } if items.len() > MAX_BATCH_FORGET => {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::BatchForget { items } => {
            for (node, n) in items {
                vfs.forget(o, node, n);
            }
            ReplyBody::ok()
        }
        Op::Retain { items } if items.len() > MAX_BATCH_FORGET => ReplyBody::Err(Errno::EINVAL),
        Op::Retain { items } => {
            for (node, n) in items {
                vfs.retain(o, node, n);
            }
            ReplyBody::ok()
        }
        Op::Getattr { node, fh } => reply(vfs.getattr(o, node, fh), |a| s.attr(a)),
        Op::Setattr {
            node,
            fh,
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
            reply(vfs.setattr(o, node, fh, set), |a| s.attr(a))
        }
        Op::Readlink { node } => reply(vfs.readlink(node), ReplyBody::Data),
        Op::Symlink {
            parent,
            name,
            target,
            uid,
            gid,
        } => reply(vfs.symlink(o, parent, &name, &target, uid, gid), |a| {
            ReplyBody::Entry(s.new_entry(vfs, parent, a))
        }),
        Op::Mknod {
            parent,
            name,
            mode,
            rdev,
            uid,
            gid,
        } => reply(vfs.mknod(o, parent, &name, mode, rdev, uid, gid), |a| {
            ReplyBody::Entry(s.new_entry(vfs, parent, a))
        }),
        Op::Mkdir {
            parent,
            name,
            mode,
            uid,
            gid,
        } => reply(vfs.mkdir(o, parent, &name, mode, uid, gid), |a| {
            ReplyBody::Entry(s.new_entry(vfs, parent, a))
        }),
        Op::Unlink { parent, name } => removed(vfs, s, parent, vfs.unlink(parent, &name)),
        Op::Rmdir { parent, name } => removed(vfs, s, parent, vfs.rmdir(parent, &name)),
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
        } => reply(vfs.link(o, node, new_parent, &new_name), |a| {
            ReplyBody::Entry(s.new_entry(vfs, new_parent, a))
        }),
        Op::Open { node, flags, read } => match vfs.open(o, node, flags) {
            Ok(fh) => {
                // The first read rides along when asked, by the rules of a Read; if it
                // fails (a write-only handle, a bad size) the client reads as usual.
                let data = read.and_then(|r| {
                    let op = Op::Read {
                        fh,
                        offset: r.offset,
                        size: r.size,
                    };
                    match dispatch(vfs, s, op) {
                        ReplyBody::Data(d) => Some(ByteBuf::from(d)),
                        _ => None,
                    }
                });
                ReplyBody::Opened {
                    fh,
                    keep_cache: true,
                    data,
                    list: None,
                }
            }
            Err(e) => ReplyBody::Err(e),
        },
        Op::Read { size, .. } if size > s.limits.max_read => ReplyBody::Err(Errno::EINVAL),
        Op::Read { fh, offset, size } => reply(vfs.read(o, fh, offset, size), ReplyBody::Data),
        Op::Write { data, .. } if data.len() > s.limits.max_write as usize => {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::Write { fh, offset, data } => reply(vfs.write(o, fh, offset, &data), |size| {
            // The attributes after the write, so the client need not ask for them.
            let attr = vfs.fgetattr(o, fh).ok();
            ReplyBody::Written {
                size,
                attr,
                attr_ttl_ms: attr.map(|_| s.ttl_ms),
            }
        }),
        Op::Flush { fh, .. } => ok(vfs.flush(o, fh)),
        Op::Release { fh } => ok(vfs.release(o, fh)),
        Op::Releasedir { fh } => ok(vfs.releasedir(o, fh)),
        Op::Fsync { fh, datasync } => ok(vfs.fsync(o, fh, datasync)),
        Op::Opendir { node, list } => match vfs.opendir(o, node) {
            Ok(fh) => {
                // The first page rides along when asked, by the rules of a Readdirplus
                // (the capability agreed, a valid count).
                let list = list.and_then(|max_entries| {
                    let op = Op::Readdirplus {
                        fh,
                        cookie: 0,
                        max_entries,
                    };
                    match dispatch(vfs, s, op) {
                        ReplyBody::DirPlus { entries, eof } => Some(DirList { entries, eof }),
                        _ => None,
                    }
                });
                ReplyBody::Opened {
                    fh,
                    keep_cache: true,
                    data: None,
                    list,
                }
            }
            Err(e) => ReplyBody::Err(e),
        },
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
        Op::Fsyncdir { fh, .. } => ok(vfs.fsyncdir(o, fh)),
        Op::Statfs { node } => reply(vfs.statfs(node), ReplyBody::Statfs),
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
        } => created(
            vfs,
            s,
            parent,
            vfs.create(o, parent, &name, mode, flags, uid, gid),
        ),
        Op::Fallocate {
            fh,
            offset,
            length,
            mode,
        } => ok(vfs.fallocate(o, fh, offset, length, mode)),
        Op::Lseek { fh, offset, whence } => reply(vfs.lseek(o, fh, offset, whence), |offset| {
            ReplyBody::Offset { offset }
        }),
        Op::ReadFiles { nodes, max_size }
            if nodes.len() > MAX_READ_FILES || max_size > s.limits.max_read =>
        {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::ReadFiles { nodes, max_size } => read_files(vfs, s, &nodes, max_size),
        Op::ListDirs { nodes, max_entries }
            if nodes.len() > MAX_LIST_DIRS
                || max_entries == 0
                || max_entries > MAX_READDIR_ENTRIES =>
        {
            ReplyBody::Err(Errno::EINVAL)
        }
        Op::ListDirs { nodes, max_entries } => list_dirs(vfs, s, &nodes, max_entries),
        Op::Reserve { count } => reserve(vfs, s, count),
        Op::CreateAs {
            parent,
            name,
            mode,
            flags,
            uid,
            gid,
            node,
            data,
        } => {
            if !s.reserved().remove(&node) {
                return ReplyBody::Err(Errno::EINVAL);
            }
            let r = vfs.create_as(o, parent, &name, mode, flags, uid, gid, node, &data);
            created(vfs, s, parent, r)
        }
        Op::Batch { ops } => batch(vfs, s, ops),
    }
}

/// The reply to a create in `parent`: the entry, with the directory's new attributes.
fn created(vfs: &Vfs, s: &Session, parent: u64, r: VfsResult<(Attr, u64)>) -> ReplyBody {
    reply(r, |(a, fh)| ReplyBody::Created {
        entry: s.new_entry(vfs, parent, a),
        fh,
    })
}

/// `reserve`: fresh ids for this connection's `create_as`, at most [`MAX_RESERVED`]
/// unused at once.
fn reserve(vfs: &Vfs, s: &Session, count: u32) -> ReplyBody {
    if count == 0 || count > MAX_RESERVE {
        return ReplyBody::Err(Errno::EINVAL);
    }
    let mut held = s.reserved();
    if held.len() + count as usize > MAX_RESERVED {
        return ReplyBody::Err(Errno::EAGAIN);
    }
    match vfs.reserve_ids(count) {
        Ok(first) => {
            held.extend(first..first + count as u64);
            ReplyBody::Reserved { first, count }
        }
        Err(e) => ReplyBody::Err(e),
    }
}

/// Bytes of a `batch` reply besides its replies.
const BATCH_REPLY_BASE: usize = 64;
/// The most one reply of a request allowed in a batch encodes to (a `created` with the
/// entry and the directory's attributes, every field at its largest).
const BATCH_ITEM_MAX: usize = 1024;

/// `batch`: the requests in order, each as if alone. Only requests with small replies
/// may be in one; the requests whose replies might not fit the frame are not executed,
/// and the reply is shorter than the request (docs/PROTOCOL.md §7.1).
fn batch(vfs: &Vfs, s: &Session, ops: Vec<Timed>) -> ReplyBody {
    if ops.len() > MAX_BATCH {
        return ReplyBody::Err(Errno::EINVAL);
    }
    let room = (s.limits.max_frame as usize).saturating_sub(BATCH_REPLY_BASE);
    let fit = room / BATCH_ITEM_MAX;
    let replies = ops
        .into_iter()
        .take(fit)
        .map(|Timed { at, op }| match op {
            Op::CreateAs { .. } | Op::Write { .. } | Op::Unlink { .. } | Op::Release { .. } => {
                crate::vfs::at_time((at.0, at.1), || dispatch(vfs, s, op))
            }
            _ => ReplyBody::Err(Errno::EINVAL),
        })
        .collect();
    ReplyBody::Batch { replies }
}

/// Bytes of a `files` reply besides the files' data: the envelope and the request id.
const FILES_REPLY_BASE: usize = 64;
/// Bytes of one `files` item besides its data: keys, node id and length headers.
const FILE_ITEM_COST: usize = 32;

/// The whole contents of the named regular files no longer than `max_size`, in the
/// order asked, as many as fit the frame; nodes that are missing, not regular files or
/// longer are left out (docs/PROTOCOL.md §7.1).
fn read_files(vfs: &Vfs, s: &Session, nodes: &[u64], max_size: u32) -> ReplyBody {
    let room = (s.limits.max_frame as usize).saturating_sub(FILES_REPLY_BASE);
    let mut used = 0usize;
    let mut files = Vec::new();
    for &node in nodes {
        // Never more read than the reply can carry: a file that would not fit ends it.
        let fits = room.saturating_sub(used + FILE_ITEM_COST) as u64;
        let data = match vfs.read_whole(node, fits.min(max_size as u64)) {
            Ok(Ok(d)) => d,
            Ok(Err(size)) if size <= max_size as u64 => break,
            _ => continue,
        };
        used += data.len() + FILE_ITEM_COST;
        files.push(FileData {
            node,
            data: ByteBuf::from(data),
        });
    }
    ReplyBody::Files { files }
}

/// Bytes of a `listings` reply besides its listings, and of one listing besides its
/// entries.
const LISTINGS_REPLY_BASE: usize = 1024;
const LISTING_ITEM_COST: usize = 32;
/// Worst-case encoded size of one `readdirplus` entry beside its name (every attribute
/// at its largest).
const PLUS_ENTRY_COST: usize = 320;

/// The whole listing of each named directory of at most `max_entries` entries, in
/// order, up to the first that would not fit the frame (docs/PROTOCOL.md §7.1).
fn list_dirs(vfs: &Vfs, s: &Session, nodes: &[u64], max_entries: u32) -> ReplyBody {
    let room = (s.limits.max_frame as usize).saturating_sub(LISTINGS_REPLY_BASE);
    let mut used = 0usize;
    let mut dirs = Vec::new();
    for &node in nodes {
        // What the listing needs of the frame, once its entries are counted.
        let mut need = None;
        let listed = vfs.list_whole(node, max_entries, |count, names| {
            let n = LISTING_ITEM_COST + count * PLUS_ENTRY_COST + names;
            need = Some(n);
            used + n <= room
        });
        if let Ok(Some(items)) = listed {
            used += need.unwrap_or(LISTING_ITEM_COST);
            dirs.push(DirListing {
                node,
                entries: Some(entries_plus(vfs, s, items)),
            });
            continue;
        }
        // One that fits a frame of its own ends this reply; one that fits none, or is
        // not a directory or too long, is answered without entries.
        if need.is_some_and(|n| n <= room) && !dirs.is_empty() {
            break;
        }
        used += LISTING_ITEM_COST;
        dirs.push(DirListing {
            node,
            entries: None,
        });
    }
    ReplyBody::Listings { dirs }
}

/// A page of entries that fits the negotiated frame. Only the entries sent are referenced.
fn readdir(vfs: &Vfs, s: &Session, fh: u64, cookie: u64, max: u32, plus: bool) -> ReplyBody {
    let items = match vfs.readdir(s.owner, fh, cookie, max) {
        Ok(i) => i,
        Err(e) => return ReplyBody::Err(e),
    };
    let budget = s.limits.max_frame as usize - 1024;
    // Worst-case encoded sizes beside the name (an entry with every attribute at its
    // largest), so a page never overflows the frame after its references are taken.
    let per_entry = if plus { PLUS_ENTRY_COST } else { 64 };
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
    let mut items = items;
    items.truncate(n);
    if !plus {
        return ReplyBody::Dir {
            entries: items
                .into_iter()
                .map(|i| DirEntry {
                    name: i.name,
                    ino: i.node,
                    kind: i.kind,
                    cookie: i.cookie,
                })
                .collect(),
            eof,
        };
    }
    ReplyBody::DirPlus {
        entries: entries_plus(vfs, s, items),
        eof,
    }
}

/// Listing entries with their attributes, each (but `.` and `..`) referenced.
fn entries_plus(vfs: &Vfs, s: &Session, items: Vec<DirItem>) -> Vec<DirEntryPlus> {
    vfs.entries_plus(s.owner, items)
        .into_iter()
        .map(|(i, attr)| DirEntryPlus {
            name: i.name,
            cookie: i.cookie,
            entry: s.entry(attr),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexz_protocol::{encode_frame, Reply, Timespec};

    fn encoded(body: ReplyBody) -> usize {
        let mut out = Vec::new();
        encode_frame(
            &Reply {
                id: u64::MAX,
                r: body,
            },
            u32::MAX,
            &mut out,
        )
        .unwrap();
        out.len()
    }

    /// What a batch reserves per reply must cover the largest reply a batch request can
    /// get, or a full batch's reply would not fit the frame.
    #[test]
    fn every_reply_a_batch_allows_fits_its_share_of_the_frame() {
        let t = Timespec(i64::MIN, 999_999_999);
        let a = Attr {
            ino: u64::MAX,
            mode: u32::MAX,
            nlink: u32::MAX,
            uid: u32::MAX,
            gid: u32::MAX,
            rdev: u64::MAX,
            size: u64::MAX,
            blocks: u64::MAX,
            blksize: u32::MAX,
            atime: t,
            mtime: t,
            ctime: t,
        };
        let entry = Entry {
            node: u64::MAX,
            generation: u64::MAX,
            attr: a,
            entry_ttl_ms: u32::MAX,
            attr_ttl_ms: u32::MAX,
            dir_attr: Some(a),
        };
        let worst = [
            ReplyBody::Created {
                entry,
                fh: u64::MAX,
            },
            ReplyBody::Written {
                size: u32::MAX,
                attr: Some(a),
                attr_ttl_ms: Some(u32::MAX),
            },
            ReplyBody::Ok {
                dir_attr: Some(a),
                attr_ttl_ms: Some(u32::MAX),
            },
            ReplyBody::Err(Errno::EINVAL),
        ];
        for body in worst {
            let name = body.name();
            let n = encoded(body);
            assert!(n <= BATCH_ITEM_MAX, "{name}: {n} bytes");
        }
        // The envelope of a batch reply with no replies.
        assert!(encoded(ReplyBody::Batch { replies: vec![] }) <= BATCH_REPLY_BASE);
    }
}
