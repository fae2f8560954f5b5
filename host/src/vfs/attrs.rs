//! Attributes: what `stat` shows, `setattr` (chmod, chown, utimens, truncate), `statfs`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hexz_protocol::{Attr, Errno, SetTime, Statfs, Timespec};

use super::{kind_bits, now, ts, Inner, Vfs, VfsResult, BLOCK};
use crate::overlay::journal::{Kind, NodeRec, Record};
use crate::snapshot::NodeKind;

/// Attribute changes requested by `setattr`; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

fn set_time(t: SetTime) -> VfsResult<(i64, u32)> {
    match t {
        SetTime::Now => Ok(now()),
        SetTime::At(Timespec(_, n)) if n >= 1_000_000_000 => Err(Errno::EINVAL),
        SetTime::At(Timespec(s, n)) => Ok((s, n)),
    }
}

impl Vfs {
    pub(super) fn attr_of(&self, inner: &Inner, rec: &NodeRec) -> Attr {
        // Snapshot bytes still visible: all of them (summed at open) unless truncated.
        let lower_blocks = || match rec
            .lower
            .and_then(|i| self.snap.node(i).map(|n| (i, &n.kind)))
        {
            Some((i, NodeKind::File(f))) if rec.lower_limit >= f.size => self.snap.stored_bytes(i),
            Some((_, NodeKind::File(f))) => f
                .extents
                .iter()
                .filter(|e| e.offset < rec.lower_limit)
                .map(|e| self.snap.index().chunks[e.chunk as usize].len as u64)
                .sum::<u64>(),
            _ => 0,
        };
        let blocks = match rec.kind {
            Kind::Dir => 8,
            Kind::File => {
                // Known since the last write (no stat per getattr); measured once otherwise.
                let known = self
                    .upper_sizes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&rec.id)
                    .copied();
                let upper = match (rec.upper, known) {
                    (false, _) => 0,
                    (true, Some(b)) => b,
                    (true, None) => std::fs::metadata(inner.overlay.upper_path(rec.id))
                        .map_or(0, |m| m.blocks() * 512),
                };
                (upper + lower_blocks()).div_ceil(512)
            }
            _ => 0,
        };
        Attr {
            ino: rec.id,
            mode: kind_bits(&rec.kind, rec.mode) | (rec.mode & 0o7777),
            nlink: rec.nlink,
            uid: rec.uid,
            gid: rec.gid,
            rdev: rec.rdev,
            size: rec.size,
            blocks,
            blksize: BLOCK as u32,
            atime: ts(rec.atime),
            mtime: ts(rec.mtime),
            ctime: ts(rec.ctime),
        }
    }

    pub(super) fn attr(&self, inner: &Inner, id: u64) -> VfsResult<Attr> {
        let rec = self.rec(inner, id)?;
        Ok(self.attr_of(inner, &rec))
    }

    /// A node's attributes. With `fh`, it must be an open handle of `owner` on `node`.
    pub fn getattr(&self, owner: u64, node: u64, fh: Option<u64>) -> VfsResult<Attr> {
        if let Some(fh) = fh {
            self.check_handle(owner, fh, node)?;
        }
        self.attr(&self.state(), node)
    }

    /// The attributes of the node open as `fh`, a handle of `owner`.
    pub fn fgetattr(&self, owner: u64, fh: u64) -> VfsResult<Attr> {
        // The handle table's guard goes at the end of this statement, before the state
        // lock is taken (leaf locks are never held across another lock).
        let node = self.handles().get(owner, fh)?.node;
        self.attr(&self.state(), node)
    }

    fn check_handle(&self, owner: u64, fh: u64, node: u64) -> VfsResult<()> {
        match self.handles().get(owner, fh) {
            Ok(h) if h.node == node => Ok(()),
            _ => Err(Errno::EBADF),
        }
    }

    pub fn setattr(&self, owner: u64, node: u64, fh: Option<u64>, set: SetAttr) -> VfsResult<Attr> {
        if let Some(fh) = fh {
            self.check_handle(owner, fh, node)?;
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let atime = set.atime.map(set_time).transpose()?;
        let mtime = set.mtime.map(set_time).transpose()?;
        // A size change moves data: under the node's data lock, outside the state lock.
        let _data = set.size.map(|_| self.node_lock(node));
        if let Some(size) = set.size {
            self.truncate(node, size)?;
        }
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        let t = now();
        if set.size.is_some() {
            rec.mtime = t;
        }
        if let Some(mode) = set.mode {
            rec.mode = (rec.mode & libc::S_IFMT) | (mode & 0o7777);
        }
        if let Some(uid) = set.uid {
            rec.uid = uid;
        }
        if let Some(gid) = set.gid {
            rec.gid = gid;
        }
        if let Some(a) = atime {
            rec.atime = a;
        }
        if let Some(m) = mtime {
            rec.mtime = m;
        }
        rec.ctime = t;
        self.commit(&mut inner, vec![Record::Node(rec.clone())])?;
        Ok(self.attr_of(&inner, &rec))
    }

    pub fn readlink(&self, node: u64) -> VfsResult<Vec<u8>> {
        match self.rec(&self.state(), node)?.kind {
            Kind::Symlink(t) => Ok(t),
            _ => Err(Errno::EINVAL),
        }
    }

    /// File system figures; with `--overlay-size`, space is the overlay's limit.
    pub fn statfs(&self, node: u64) -> VfsResult<Statfs> {
        let inner = self.state();
        self.rec(&inner, node)?;
        let dir = inner.overlay.dir();
        let dir = if dir.as_os_str().is_empty() {
            self.snap.path().parent().unwrap_or(Path::new("/"))
        } else {
            dir
        };
        let s = nix::sys::statvfs::statvfs(dir).map_err(|e| Errno(e as i32 as u32).sanitized())?;
        let nodes = (self.snap.index().nodes.len() + inner.overlay.state.nodes.len()) as u64;
        let frsize = (s.fragment_size() as u64).max(1);
        let (blocks, bfree, bavail) = match self.overlay_size {
            Some(limit) => {
                let free = limit.saturating_sub(self.overlay_used()) / frsize;
                (limit / frsize, free, free)
            }
            None => (
                s.blocks() as u64,
                s.blocks_free() as u64,
                s.blocks_available() as u64,
            ),
        };
        let ro = self.read_only;
        Ok(Statfs {
            blocks,
            bfree: if ro { 0 } else { bfree },
            bavail: if ro { 0 } else { bavail },
            files: nodes + s.files_free() as u64,
            ffree: if ro { 0 } else { s.files_free() as u64 },
            bsize: s.block_size() as u32,
            frsize: frsize as u32,
            namelen: 255,
        })
    }
}
