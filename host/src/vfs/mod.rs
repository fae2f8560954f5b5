//! The VFS core: the snapshot (read-only lower layer) merged with the overlay (every
//! change), with local-filesystem semantics. Every front end (protocol server, tests,
//! the host mount) calls this and only translates.
//!
//! Node ids are stable: snapshot nodes are `index + 1` (root = 1), new nodes get ids
//! from a journaled counter, and nothing is ever renumbered. Names from callers are
//! checked by `hexz_protocol::check_name`; nodes and handles are looked up in maps, so no
//! caller-supplied value is ever used as a host path.

mod data;
pub mod handles;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hexz_protocol::message::{RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE};
use hexz_protocol::{check_name, Attr, Errno, SetTime, Statfs, Timespec};

use crate::error::Error;
use crate::overlay::journal::{Kind, NodeRec, Record};
use crate::overlay::{lower_id, Overlay};
use crate::snapshot::{NodeKind, Snapshot};
use handles::{HandleKind, Handles, OpenHandle};

pub type VfsResult<T> = Result<T, Errno>;

/// The root directory's node id.
pub const ROOT: u64 = 1;
pub const BLOCK: u64 = 4096;

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

/// What a new node is made of (the name and parent are given separately).
struct NewNode {
    kind: Kind,
    mode: u32,
    rdev: u64,
    uid: u32,
    gid: u32,
}

/// A directory's children: (name, node id), sorted by name.
pub type Children = Vec<(Vec<u8>, u64)>;

/// One directory entry as `readdir` returns it.
#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: Vec<u8>,
    pub node: u64,
    pub kind: u32,
    pub cookie: u64,
}

pub(crate) struct Inner {
    pub(crate) overlay: Overlay,
    /// Data written but not yet journaled (present ranges, size and times live in memory).
    pending_present: HashMap<u64, Vec<(u64, u64)>>,
}

pub struct Vfs {
    snap: Arc<Snapshot>,
    read_only: bool,
    inner: RwLock<Inner>,
    handles: Mutex<Handles>,
    /// What keeps a node alive after its last name is gone: open handles plus the
    /// references clients hold from lookups (released by forget or disconnect).
    pins: Mutex<HashMap<u64, u64>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// New upper files exist whose directory entries are not yet fsynced.
    data_dir_dirty: AtomicBool,
    fs_id: Vec<u8>,
}

/// The one place host errors become errno values for the VFS's callers.
pub fn errno_of(e: &Error) -> Errno {
    match e {
        Error::Io { err, .. } => Errno::from_io(err),
        Error::At { err, .. } => errno_of(err),
        Error::NotFound(_) => Errno::ENOENT,
        Error::Invalid(_) => Errno::EINVAL,
        Error::Corrupt(_) | Error::NotASnapshot | Error::UnsupportedVersion(_) => {
            tracing::error!("snapshot failed verification: {e}");
            Errno::EIO
        }
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_io(&e)
}

pub(crate) fn now() -> (i64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn ts(t: (i64, u32)) -> Timespec {
    Timespec(t.0, t.1)
}

fn set_time(t: SetTime) -> (i64, u32) {
    match t {
        SetTime::Now => now(),
        SetTime::At(Timespec(s, n)) => (s, n.min(999_999_999)),
    }
}

fn kind_bits(k: &Kind, mode: u32) -> u32 {
    match k {
        Kind::Dir => libc::S_IFDIR,
        Kind::File => libc::S_IFREG,
        Kind::Symlink(_) => libc::S_IFLNK,
        Kind::Device => mode & libc::S_IFMT,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
    }
}

fn is_write(flags: u32) -> bool {
    (flags as i32 & libc::O_ACCMODE) != libc::O_RDONLY
}

impl Vfs {
    /// Serves `snap` merged with the overlay in `overlay_dir` (created if missing), or an
    /// ephemeral overlay when `None`. `read_only` refuses every change with EROFS.
    pub fn new(
        snap: Arc<Snapshot>,
        overlay_dir: Option<&Path>,
        read_only: bool,
    ) -> crate::Result<Vfs> {
        if !snap.has_tree() {
            return Err(Error::Invalid(format!(
                "{}: snapshot has no file tree to serve (stream-only)",
                snap.path().display()
            )));
        }
        let overlay = Overlay::open(&snap, overlay_dir, read_only)?;
        let mut h = blake3::Hasher::new();
        h.update(&snap.id());
        h.update(&overlay.id);
        let fs_id = h.finalize().as_bytes()[..16].to_vec();
        Ok(Vfs {
            snap,
            read_only,
            inner: RwLock::new(Inner {
                overlay,
                pending_present: HashMap::new(),
            }),
            handles: Mutex::new(Handles::default()),
            pins: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            data_dir_dirty: AtomicBool::new(false),
            fs_id,
        })
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Identifies snapshot + overlay; the same after a restart on the same overlay.
    pub fn fs_id(&self) -> &[u8] {
        &self.fs_id
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn state(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> VfsResult<RwLockWriteGuard<'_, Inner>> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        Ok(self.inner.write().unwrap_or_else(|p| p.into_inner()))
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- reading the merged tree ----

    /// The node's current record: the overlay's, or one derived from the snapshot.
    pub(crate) fn rec(&self, inner: &Inner, id: u64) -> VfsResult<NodeRec> {
        if let Some(r) = inner.overlay.state.nodes.get(&id) {
            return Ok(r.clone());
        }
        self.lower_rec(inner, id)
    }

    fn lower_rec(&self, inner: &Inner, id: u64) -> VfsResult<NodeRec> {
        if inner.overlay.state.gone.contains(&id) {
            return Err(Errno::ESTALE);
        }
        let idx = id
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(Errno::ESTALE)?;
        let n = self.snap.node(idx).ok_or(Errno::ESTALE)?;
        let (kind, size, parent) = match &n.kind {
            NodeKind::Dir(d) => (Kind::Dir, 0, lower_id(d.parent)),
            NodeKind::File(f) => (Kind::File, f.size, 0),
            NodeKind::Symlink(t) => (Kind::Symlink(t.clone()), t.len() as u64, 0),
            NodeKind::Device(_) => (Kind::Device, 0, 0),
            NodeKind::Fifo => (Kind::Fifo, 0, 0),
            NodeKind::Socket => (Kind::Socket, 0, 0),
        };
        Ok(NodeRec {
            id,
            lower: Some(idx),
            kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            nlink: n.nlink,
            rdev: if let NodeKind::Device(r) = n.kind {
                r
            } else {
                0
            },
            atime: (n.atime.sec, n.atime.nsec),
            mtime: (n.mtime.sec, n.mtime.nsec),
            ctime: (n.ctime.sec, n.ctime.nsec),
            xattrs: n
                .xattrs
                .iter()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
            size,
            lower_limit: size,
            parent,
            upper: false,
        })
    }

    fn attr_of(&self, inner: &Inner, rec: &NodeRec) -> Attr {
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
                let upper = if rec.upper {
                    std::fs::metadata(inner.overlay.upper_path(rec.id))
                        .map_or(0, |m| m.blocks() * 512)
                } else {
                    0
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

    fn attr(&self, inner: &Inner, id: u64) -> VfsResult<Attr> {
        let rec = self.rec(inner, id)?;
        Ok(self.attr_of(inner, &rec))
    }

    /// The child named `name` of directory `dir`, if any.
    fn child(&self, inner: &Inner, dir: u64, name: &[u8]) -> VfsResult<Option<u64>> {
        if let Some(listing) = inner.overlay.state.dirs.get(&dir) {
            return Ok(listing.get(name).copied());
        }
        let rec = self.rec(inner, dir)?;
        if rec.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let idx = rec.lower.ok_or(Errno::ESTALE)?;
        Ok(self.snap.lookup(idx, name).map(lower_id))
    }

    fn listing(&self, inner: &Inner, dir: u64) -> VfsResult<Vec<(Vec<u8>, u64)>> {
        if let Some(listing) = inner.overlay.state.dirs.get(&dir) {
            return Ok(listing.iter().map(|(k, v)| (k.clone(), *v)).collect());
        }
        let rec = self.rec(inner, dir)?;
        match rec.lower.and_then(|i| self.snap.node(i)).map(|n| &n.kind) {
            Some(NodeKind::Dir(d)) => Ok(d
                .entries
                .iter()
                .map(|e| (e.name.clone(), lower_id(e.node)))
                .collect()),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn is_empty_dir(&self, inner: &Inner, dir: u64) -> VfsResult<bool> {
        if let Some(listing) = inner.overlay.state.dirs.get(&dir) {
            return Ok(listing.is_empty());
        }
        Ok(self.listing(inner, dir)?.is_empty())
    }

    fn dir_rec(&self, inner: &Inner, dir: u64) -> VfsResult<NodeRec> {
        let rec = self.rec(inner, dir)?;
        if rec.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(rec)
    }

    pub(crate) fn commit(&self, inner: &mut Inner, records: Vec<Record>) -> VfsResult<()> {
        inner
            .overlay
            .commit(records, &self.snap)
            .map_err(|e| errno_of(&e))
    }

    // ---- operations ----

    pub fn lookup(&self, parent: u64, name: &[u8]) -> VfsResult<Attr> {
        check_name(name).map_err(|e| e.errno())?;
        let inner = self.state();
        let id = self.child(&inner, parent, name)?.ok_or(Errno::ENOENT)?;
        self.attr(&inner, id)
    }

    pub fn getattr(&self, node: u64) -> VfsResult<Attr> {
        self.attr(&self.state(), node)
    }

    pub fn setattr(&self, node: u64, set: SetAttr) -> VfsResult<Attr> {
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        let t = now();
        if let Some(size) = set.size {
            match rec.kind {
                Kind::Dir => return Err(Errno::EISDIR),
                Kind::File => {}
                _ => return Err(Errno::EINVAL),
            }
            self.truncate_locked(&mut inner, &mut rec, size)?;
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
        if let Some(a) = set.atime {
            rec.atime = set_time(a);
        }
        if let Some(m) = set.mtime {
            rec.mtime = set_time(m);
        }
        rec.ctime = t;
        let mut records = self.take_pending(&mut inner, node);
        records.push(Record::Node(rec.clone()));
        self.commit(&mut inner, records)?;
        Ok(self.attr_of(&inner, &rec))
    }

    pub fn readlink(&self, node: u64) -> VfsResult<Vec<u8>> {
        match self.rec(&self.state(), node)?.kind {
            Kind::Symlink(t) => Ok(t),
            _ => Err(Errno::EINVAL),
        }
    }

    fn make_node(&self, parent: u64, name: &[u8], new: NewNode) -> VfsResult<Attr> {
        check_name(name).map_err(|e| e.errno())?;
        let mut inner = self.write_lock()?;
        self.make_node_locked(&mut inner, parent, name, new)
    }

    fn make_node_locked(
        &self,
        inner: &mut Inner,
        parent: u64,
        name: &[u8],
        new: NewNode,
    ) -> VfsResult<Attr> {
        let NewNode {
            kind,
            mode,
            rdev,
            uid,
            gid,
        } = new;
        let mut prec = self.dir_rec(inner, parent)?;
        if self.child(inner, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let id = inner.overlay.state.next_id;
        let t = now();
        let is_dir = kind == Kind::Dir;
        let size = if let Kind::Symlink(ref target) = kind {
            target.len() as u64
        } else {
            0
        };
        let rec = NodeRec {
            id,
            lower: None,
            mode: kind_bits(&kind, mode) | (mode & 0o7777),
            kind,
            uid,
            gid,
            nlink: if is_dir { 2 } else { 1 },
            rdev,
            atime: t,
            mtime: t,
            ctime: t,
            xattrs: Vec::new(),
            size,
            lower_limit: 0,
            parent: if is_dir { parent } else { 0 },
            upper: false,
        };
        prec.mtime = t;
        prec.ctime = t;
        if is_dir {
            prec.nlink += 1;
        }
        let attr = self.attr_of(inner, &rec);
        self.commit(
            inner,
            vec![
                Record::Node(rec),
                Record::Entry {
                    dir: parent,
                    name: name.to_vec(),
                    node: Some(id),
                },
                Record::Node(prec),
            ],
        )?;
        Ok(attr)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> VfsResult<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR | libc::S_IFBLK => Kind::Device,
            _ => return Err(Errno::EINVAL),
        };
        let mode = if mode & libc::S_IFMT == 0 {
            mode | libc::S_IFREG
        } else {
            mode
        };
        self.make_node(
            parent,
            name,
            NewNode {
                kind,
                mode,
                rdev,
                uid,
                gid,
            },
        )
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> VfsResult<Attr> {
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
                uid,
                gid,
            },
        )
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> VfsResult<Attr> {
        if target.is_empty() || target.contains(&0) {
            return Err(Errno::EINVAL);
        }
        if target.len() > hexz_protocol::hello::MAX_SYMLINK_TARGET {
            return Err(Errno::ENAMETOOLONG);
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: Kind::Symlink(target.to_vec()),
                mode: 0o777,
                rdev: 0,
                uid,
                gid,
            },
        )
    }

    pub fn link(&self, node: u64, new_parent: u64, new_name: &[u8]) -> VfsResult<Attr> {
        check_name(new_name).map_err(|e| e.errno())?;
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        if rec.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        let mut prec = self.dir_rec(&inner, new_parent)?;
        if self.child(&inner, new_parent, new_name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        if rec.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        let t = now();
        rec.nlink += 1;
        rec.ctime = t;
        prec.mtime = t;
        prec.ctime = t;
        let mut records = self.take_pending(&mut inner, node);
        records.extend([
            Record::Node(rec.clone()),
            Record::Entry {
                dir: new_parent,
                name: new_name.to_vec(),
                node: Some(node),
            },
            Record::Node(prec),
        ]);
        self.commit(&mut inner, records)?;
        Ok(self.attr_of(&inner, &rec))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> VfsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> VfsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> VfsResult<()> {
        check_name(name).map_err(|e| e.errno())?;
        let mut inner = self.write_lock()?;
        let mut prec = self.dir_rec(&inner, parent)?;
        let id = self.child(&inner, parent, name)?.ok_or(Errno::ENOENT)?;
        let mut rec = self.rec(&inner, id)?;
        match (dir, rec.kind == Kind::Dir) {
            (false, true) => return Err(Errno::EISDIR),
            (true, false) => return Err(Errno::ENOTDIR),
            (true, true) if !self.is_empty_dir(&inner, id)? => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let t = now();
        prec.mtime = t;
        prec.ctime = t;
        if dir {
            prec.nlink = prec.nlink.saturating_sub(1);
        }
        rec.nlink = if dir { 0 } else { rec.nlink.saturating_sub(1) };
        rec.ctime = t;
        let mut records = self.take_pending(&mut inner, id);
        records.extend([
            Record::Entry {
                dir: parent,
                name: name.to_vec(),
                node: None,
            },
            Record::Node(prec),
        ]);
        let orphan = rec.nlink == 0;
        records.push(Record::Node(rec));
        self.commit(&mut inner, records)?;
        if orphan && self.pinned(id) == 0 {
            self.drop_node(&mut inner, id)?;
        }
        Ok(())
    }

    fn drop_node(&self, inner: &mut Inner, id: u64) -> VfsResult<()> {
        self.files_lock().remove(&id);
        inner.pending_present.remove(&id);
        inner.overlay.drop_node(id).map_err(|e| errno_of(&e))
    }

    fn files_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<File>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> VfsResult<()> {
        check_name(name).map_err(|e| e.errno())?;
        check_name(new_name).map_err(|e| e.errno())?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(Errno::EINVAL);
        }
        let mut inner = self.write_lock()?;
        self.dir_rec(&inner, parent)?;
        self.dir_rec(&inner, new_parent)?;
        let src = self.child(&inner, parent, name)?.ok_or(Errno::ENOENT)?;
        let dst = self.child(&inner, new_parent, new_name)?;
        if flags & RENAME_EXCHANGE != 0 && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        if dst == Some(src) {
            return Ok(()); // same file (or hard links to it): POSIX says do nothing
        }
        let src_rec = self.rec(&inner, src)?;
        let dst_rec = dst.map(|d| self.rec(&inner, d)).transpose()?;
        let src_dir = src_rec.kind == Kind::Dir;
        // A directory may not move below itself (nor may the target, when exchanging).
        if src_dir && self.is_ancestor(&inner, src, new_parent)? {
            return Err(Errno::EINVAL);
        }
        if let Some(d) = &dst_rec {
            if flags & RENAME_EXCHANGE != 0
                && d.kind == Kind::Dir
                && self.is_ancestor(&inner, d.id, parent)?
            {
                return Err(Errno::EINVAL);
            }
        }
        let t = now();
        // Every node whose record changes, by id (the parents may coincide).
        let mut changed: HashMap<u64, NodeRec> = HashMap::new();
        changed.insert(src, src_rec);
        for p in [parent, new_parent] {
            if let std::collections::hash_map::Entry::Vacant(v) = changed.entry(p) {
                v.insert(self.rec(&inner, p)?);
            }
        }
        let nlink_delta = |changed: &mut HashMap<u64, NodeRec>, id: u64, up: bool| {
            if let Some(r) = changed.get_mut(&id) {
                r.nlink = if up {
                    r.nlink + 1
                } else {
                    r.nlink.saturating_sub(1)
                };
            }
        };
        let mut records = Vec::new();
        let mut dropped = None;
        if flags & RENAME_EXCHANGE != 0 {
            let d = dst_rec.ok_or(Errno::ENOENT)?;
            let dst_dir = d.kind == Kind::Dir;
            records.push(Record::Entry {
                dir: parent,
                name: name.to_vec(),
                node: Some(d.id),
            });
            records.push(Record::Entry {
                dir: new_parent,
                name: new_name.to_vec(),
                node: Some(src),
            });
            if parent != new_parent && src_dir != dst_dir {
                let (gains, loses) = if src_dir {
                    (new_parent, parent)
                } else {
                    (parent, new_parent)
                };
                nlink_delta(&mut changed, gains, true);
                nlink_delta(&mut changed, loses, false);
            }
            let mut d = d;
            d.ctime = t;
            if dst_dir {
                d.parent = parent;
            }
            changed.insert(d.id, d);
            if let Some(s) = changed.get_mut(&src) {
                if src_dir {
                    s.parent = new_parent;
                }
            }
        } else {
            if let Some(mut d) = dst_rec {
                match (src_dir, d.kind == Kind::Dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !self.is_empty_dir(&inner, d.id)? => {
                        return Err(Errno::ENOTEMPTY)
                    }
                    _ => {}
                }
                d.ctime = t;
                if d.kind == Kind::Dir {
                    d.nlink = 0;
                    nlink_delta(&mut changed, new_parent, false);
                } else {
                    d.nlink = d.nlink.saturating_sub(1);
                }
                if d.nlink == 0 {
                    dropped = Some(d.id);
                    records.extend(self.take_pending(&mut inner, d.id));
                }
                changed.insert(d.id, d);
            }
            records.push(Record::Entry {
                dir: parent,
                name: name.to_vec(),
                node: None,
            });
            records.push(Record::Entry {
                dir: new_parent,
                name: new_name.to_vec(),
                node: Some(src),
            });
            if src_dir && parent != new_parent {
                if let Some(s) = changed.get_mut(&src) {
                    s.parent = new_parent;
                }
                nlink_delta(&mut changed, parent, false);
                nlink_delta(&mut changed, new_parent, true);
            }
        }
        for (id, r) in changed.iter_mut() {
            r.ctime = t;
            if *id == parent || *id == new_parent {
                r.mtime = t;
            }
        }
        let mut ids: Vec<_> = changed.keys().copied().collect();
        ids.sort_unstable();
        records.extend(ids.into_iter().map(|id| Record::Node(changed[&id].clone())));
        self.commit(&mut inner, records)?;
        if let Some(id) = dropped {
            if self.pinned(id) == 0 {
                self.drop_node(&mut inner, id)?;
            }
        }
        Ok(())
    }

    /// Whether `dir` is `node` or lies below it.
    fn is_ancestor(&self, inner: &Inner, node: u64, mut dir: u64) -> VfsResult<bool> {
        for _ in 0..100_000 {
            if dir == node {
                return Ok(true);
            }
            if dir == ROOT {
                return Ok(false);
            }
            dir = self.rec(inner, dir)?.parent;
        }
        Err(Errno::ELOOP)
    }

    pub fn open(&self, node: u64, flags: u32, owner: u64) -> VfsResult<u64> {
        let write = is_write(flags);
        let trunc = flags as i32 & libc::O_TRUNC != 0;
        if self.read_only && (write || trunc) {
            return Err(Errno::EROFS);
        }
        {
            let rec = self.rec(&self.state(), node)?;
            match rec.kind {
                Kind::Dir if write => return Err(Errno::EISDIR),
                Kind::Dir => {}
                Kind::File => {}
                _ if write => return Err(Errno::EINVAL),
                _ => {}
            }
            if trunc && write && rec.kind == Kind::File && rec.size != 0 {
                self.setattr(
                    node,
                    SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    },
                )?;
            }
        }
        let append = flags as i32 & libc::O_APPEND != 0;
        self.new_handle(node, owner, HandleKind::File { append, write })
    }

    fn new_handle(&self, node: u64, owner: u64, kind: HandleKind) -> VfsResult<u64> {
        let fh = self.handles().insert(OpenHandle { node, owner, kind })?;
        self.pin(node, 1);
        Ok(fh)
    }

    /// Create-and-open. With `O_EXCL` an existing name is EEXIST; otherwise the existing
    /// file is opened (and truncated with `O_TRUNC`).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
        owner: u64,
    ) -> VfsResult<(Attr, u64)> {
        check_name(name).map_err(|e| e.errno())?;
        let node = {
            let mut inner = self.write_lock()?;
            match self.child(&inner, parent, name)? {
                Some(_) if flags as i32 & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(id) => id,
                None => {
                    let mode = libc::S_IFREG | (mode & 0o7777);
                    self.make_node_locked(
                        &mut inner,
                        parent,
                        name,
                        NewNode {
                            kind: Kind::File,
                            mode,
                            rdev: 0,
                            uid,
                            gid,
                        },
                    )?
                    .ino
                }
            }
        };
        let fh = self.open(node, flags, owner)?;
        Ok((self.getattr(node)?, fh))
    }

    pub fn opendir(&self, node: u64, owner: u64) -> VfsResult<u64> {
        self.dir_rec(&self.state(), node)?;
        self.new_handle(node, owner, HandleKind::Dir { listing: None })
    }

    /// Entries after `cookie` (0 = from the start, which also refreshes the listing):
    /// `.`, `..`, then the children as they were at the last refresh.
    pub fn readdir(&self, fh: u64, cookie: u64, max: u32) -> VfsResult<Vec<DirItem>> {
        let (node, cached) = {
            let handles = self.handles();
            let h = handles.get(fh)?;
            match &h.kind {
                HandleKind::Dir { listing } => {
                    (h.node, if cookie == 0 { None } else { listing.clone() })
                }
                HandleKind::File { .. } => return Err(Errno::ENOTDIR),
            }
        };
        let inner = self.state();
        let listing = match cached {
            Some(l) => l,
            None => {
                let parent = if node == ROOT {
                    ROOT
                } else {
                    self.rec(&inner, node).map_or(ROOT, |r| r.parent)
                };
                let mut v = vec![(b".".to_vec(), node), (b"..".to_vec(), parent)];
                // A directory removed while open lists as empty.
                v.extend(self.listing(&inner, node).unwrap_or_default());
                let v = Arc::new(v);
                if let Ok(OpenHandle {
                    kind: HandleKind::Dir { listing },
                    ..
                }) = self.handles().get_mut(fh)
                {
                    *listing = Some(v.clone());
                }
                v
            }
        };
        let start = cookie.min(listing.len() as u64) as usize;
        let mut out = Vec::new();
        for (i, (name, id)) in listing.iter().enumerate().skip(start) {
            if out.len() >= max.max(1) as usize {
                break;
            }
            let Ok(r) = self.rec(&inner, *id) else {
                continue;
            }; // removed since the listing was taken
            out.push(DirItem {
                name: name.clone(),
                node: *id,
                kind: kind_bits(&r.kind, r.mode),
                cookie: i as u64 + 1,
            });
        }
        Ok(out)
    }

    /// A node's full record and, for a directory, its children: for exporting the merged
    /// tree (`commit`).
    pub fn export_node(&self, id: u64) -> VfsResult<(NodeRec, Option<Children>)> {
        let inner = self.state();
        let rec = self.rec(&inner, id)?;
        let listing = if rec.kind == Kind::Dir {
            Some(self.listing(&inner, id)?)
        } else {
            None
        };
        Ok((rec, listing))
    }

    /// Attributes for readdirplus entries.
    pub fn attr_many(&self, ids: &[u64]) -> Vec<VfsResult<Attr>> {
        let inner = self.state();
        ids.iter().map(|&id| self.attr(&inner, id)).collect()
    }

    pub fn release(&self, fh: u64) -> VfsResult<()> {
        let h = self.handles().get(fh)?.clone();
        if matches!(h.kind, HandleKind::File { write: true, .. }) {
            self.flush_node(h.node)?;
        }
        self.handles().remove(fh)?;
        self.unpin(h.node, 1);
        Ok(())
    }

    /// Keeps `node` alive (even without names) until as many `unpin`s.
    pub fn pin(&self, node: u64, n: u64) {
        *self
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node)
            .or_default() += n;
    }

    /// Releases `n` references; a node with no names and no references left is removed.
    pub fn unpin(&self, node: u64, n: u64) {
        let free = {
            let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
            let c = pins.entry(node).or_default();
            *c = c.saturating_sub(n);
            if *c == 0 {
                pins.remove(&node);
                true
            } else {
                false
            }
        };
        if free && !self.read_only {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            let orphan = inner
                .overlay
                .state
                .nodes
                .get(&node)
                .is_some_and(|r| r.nlink == 0);
            if orphan && self.pinned(node) == 0 {
                if let Err(e) = self.drop_node(&mut inner, node) {
                    tracing::warn!(node, "removing an unreferenced node: {e}");
                }
            }
        }
    }

    fn pinned(&self, node: u64) -> u64 {
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
            .unwrap_or(0)
    }

    /// Closes every handle `owner` still holds (a connection went away).
    pub fn release_owner(&self, owner: u64) -> usize {
        let fhs = self.handles().owned_by(owner);
        let n = fhs.len();
        for fh in fhs {
            if let Err(e) = self.release(fh) {
                tracing::warn!(fh, "release on disconnect failed: {e}");
            }
        }
        n
    }

    pub fn fsyncdir(&self, fh: u64) -> VfsResult<()> {
        self.handles().get(fh)?;
        if self.read_only {
            return Ok(());
        }
        self.state().overlay.sync().map_err(|e| errno_of(&e))
    }

    pub fn statfs(&self) -> VfsResult<Statfs> {
        let inner = self.state();
        let dir = inner.overlay.dir();
        let dir = if dir.as_os_str().is_empty() {
            self.snap.path().parent().unwrap_or(Path::new("/"))
        } else {
            dir
        };
        let s = nix::sys::statvfs::statvfs(dir).map_err(|e| Errno(e as i32 as u32).sanitized())?;
        let nodes = (self.snap.index().nodes.len() + inner.overlay.state.nodes.len()) as u64;
        Ok(Statfs {
            blocks: s.blocks() as u64,
            bfree: if self.read_only {
                0
            } else {
                s.blocks_free() as u64
            },
            bavail: if self.read_only {
                0
            } else {
                s.blocks_available() as u64
            },
            files: nodes + s.files_free() as u64,
            ffree: if self.read_only {
                0
            } else {
                s.files_free() as u64
            },
            bsize: s.block_size() as u32,
            frsize: s.fragment_size() as u32,
            namelen: 255,
        })
    }

    pub fn getxattr(&self, node: u64, name: &[u8]) -> VfsResult<Vec<u8>> {
        let rec = self.rec(&self.state(), node)?;
        rec.xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or(Errno::ENODATA)
    }

    pub fn listxattr(&self, node: u64) -> VfsResult<Vec<Vec<u8>>> {
        let rec = self.rec(&self.state(), node)?;
        Ok(rec.xattrs.into_iter().map(|(n, _)| n).collect())
    }

    pub fn setxattr(&self, node: u64, name: &[u8], value: &[u8], flags: u32) -> VfsResult<()> {
        if name.is_empty() || name.contains(&0) || name.len() > hexz_protocol::hello::MAX_XATTR_NAME
        {
            return Err(if name.len() > 255 {
                Errno::ERANGE
            } else {
                Errno::EINVAL
            });
        }
        if value.len() > hexz_protocol::hello::MAX_XATTR_VALUE {
            return Err(Errno::E2BIG);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        match rec.xattrs.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
            Ok(_) if flags & XATTR_CREATE != 0 => return Err(Errno::EEXIST),
            Ok(i) => rec.xattrs[i].1 = value.to_vec(),
            Err(_) if flags & XATTR_REPLACE != 0 => return Err(Errno::ENODATA),
            Err(i) => rec.xattrs.insert(i, (name.to_vec(), value.to_vec())),
        }
        rec.ctime = now();
        let mut records = self.take_pending(&mut inner, node);
        records.push(Record::Node(rec));
        self.commit(&mut inner, records)
    }

    pub fn removexattr(&self, node: u64, name: &[u8]) -> VfsResult<()> {
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        let i = rec
            .xattrs
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .map_err(|_| Errno::ENODATA)?;
        rec.xattrs.remove(i);
        rec.ctime = now();
        let mut records = self.take_pending(&mut inner, node);
        records.push(Record::Node(rec));
        self.commit(&mut inner, records)
    }

    /// Journals everything pending and makes the overlay durable; checkpoints the journal.
    pub fn shutdown(&self) -> crate::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.overlay.is_ephemeral() {
            self.files_lock().clear();
            inner.overlay.remove_ephemeral();
            return Ok(());
        }
        let ids: Vec<u64> = inner.pending_present.keys().copied().collect();
        for id in ids {
            let records = self.take_pending(&mut inner, id);
            if let Some(rec) = inner.overlay.state.nodes.get(&id).cloned() {
                let mut records = records;
                records.push(Record::Node(rec));
                inner.overlay.commit(records, &self.snap)?;
            }
        }
        for f in self.files_lock().values() {
            f.sync_all()
                .map_err(|e| Error::io(inner.overlay.dir(), e))?;
        }
        inner.overlay.sync()?;
        inner.overlay.checkpoint()
    }
}
