//! The namespace: lookup, creating nodes, links, unlink/rmdir and rename. Every entry
//! handed to a caller takes a reference for its owner under the same lock that found or
//! made the node.

use std::collections::HashMap;

use hexz_protocol::message::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use hexz_protocol::{check_name, Attr, Errno};

use super::{kind_bits, now, Inner, Vfs, VfsResult, ROOT};
use crate::overlay::journal::{Kind, NodeRec, Record};

/// What a new node is made of (the name and parent are given separately).
pub(super) struct NewNode {
    pub kind: Kind,
    pub mode: u32,
    pub rdev: u64,
    pub uid: u32,
    pub gid: u32,
    /// A node id reserved earlier ([`Vfs::reserve_ids`]) instead of the next free one.
    pub id: Option<u64>,
}

impl Vfs {
    /// The child `name` of `parent`, referenced for `owner` (one FUSE lookup).
    pub fn lookup(&self, owner: u64, parent: u64, name: &[u8]) -> VfsResult<Attr> {
        check_name(name).map_err(|e| e.errno())?;
        let inner = self.state();
        let id = self.child(&inner, parent, name)?.ok_or(Errno::ENOENT)?;
        let attr = self.attr(&inner, id)?;
        self.refs().take(owner, id, 1);
        Ok(attr)
    }

    /// The child `name` of `parent`, without taking a reference (internal walks).
    pub fn peek(&self, parent: u64, name: &[u8]) -> VfsResult<Attr> {
        check_name(name).map_err(|e| e.errno())?;
        let inner = self.state();
        let id = self.child(&inner, parent, name)?.ok_or(Errno::ENOENT)?;
        self.attr(&inner, id)
    }

    fn make_node(&self, owner: u64, parent: u64, name: &[u8], new: NewNode) -> VfsResult<Attr> {
        check_name(name).map_err(|e| e.errno())?;
        let mut inner = self.write_lock()?;
        let attr = self.make_node_locked(&mut inner, parent, name, new)?;
        self.refs().take(owner, attr.ino, 1);
        Ok(attr)
    }

    pub(super) fn make_node_locked(
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
            id,
        } = new;
        let mut prec = self.dir_rec(inner, parent)?;
        if self.child(inner, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        self.check_space(256 + name.len() as u64)?;
        let id = match id {
            // Reserved ids are below next_id and were handed out once: one in use is a
            // caller's mistake, not a reason to reuse it.
            Some(id) if id < inner.overlay.state.next_id && self.rec(inner, id).is_err() => id,
            Some(_) => return Err(Errno::EINVAL),
            None => inner.overlay.state.next_id,
        };
        let t = now();
        let is_dir = kind == Kind::Dir;
        // A directory with the set-group-ID bit gives its group to every node made in it
        // and the bit itself to new directories (the rule Linux file systems follow; the
        // kernel has already dropped the bit from a file's mode where the caller may not
        // keep it).
        let (gid, mode) = match prec.mode & libc::S_ISGID {
            0 => (gid, mode),
            _ if is_dir => (prec.gid, mode | libc::S_ISGID),
            _ => (prec.gid, mode),
        };
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

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        owner: u64,
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
            owner,
            parent,
            name,
            NewNode {
                kind,
                mode,
                rdev,
                uid,
                gid,
                id: None,
            },
        )
    }

    pub fn mkdir(
        &self,
        owner: u64,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> VfsResult<Attr> {
        self.make_node(
            owner,
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
                uid,
                gid,
                id: None,
            },
        )
    }

    pub fn symlink(
        &self,
        owner: u64,
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
            owner,
            parent,
            name,
            NewNode {
                kind: Kind::Symlink(target.to_vec()),
                mode: 0o777,
                rdev: 0,
                uid,
                gid,
                id: None,
            },
        )
    }

    pub fn link(&self, owner: u64, node: u64, new_parent: u64, new_name: &[u8]) -> VfsResult<Attr> {
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
        let mut records = Vec::new();
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
        self.refs().take(owner, node, 1);
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
        let mut records = Vec::new();
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
        if orphan && !self.refs().pinned(id) {
            self.drop_node(&mut inner, id)?;
        }
        Ok(())
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
            if !self.refs().pinned(id) {
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
}
