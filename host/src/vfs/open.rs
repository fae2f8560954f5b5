//! Opening files and directories, listing directories, closing. A handle pins its node
//! (an unlinked file stays readable while open) and belongs to the owner that opened it.

use std::sync::Arc;

use hexz_protocol::{check_name, Attr, Errno};

use super::handles::{entry_cookie, HandleKind, Keyed, Listing, OpenHandle};
use super::names::NewNode;
use super::{errno_of, kind_bits, DirItem, Inner, Vfs, VfsResult, ROOT};
use crate::overlay::journal::Kind;

fn access(flags: u32) -> (bool, bool) {
    match flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    }
}

impl Vfs {
    /// Opens a node: regular files for reading and/or writing; directories and special
    /// files read-only (their data reads give EISDIR / EINVAL); a symlink gives ELOOP (the
    /// server never follows one). `O_TRUNC` with write access truncates.
    pub fn open(&self, owner: u64, node: u64, flags: u32) -> VfsResult<u64> {
        let (read, write) = access(flags);
        let trunc = flags as i32 & libc::O_TRUNC != 0;
        if self.read_only && (write || trunc) {
            return Err(Errno::EROFS);
        }
        let inner = self.state();
        let rec = self.rec(&inner, node)?;
        match rec.kind {
            Kind::Symlink(_) => return Err(Errno::ELOOP),
            Kind::Dir if write => return Err(Errno::EISDIR),
            Kind::File => {}
            _ if write => return Err(Errno::EINVAL),
            _ => {}
        }
        let append = flags as i32 & libc::O_APPEND != 0;
        let fh = self.new_handle(
            node,
            owner,
            HandleKind::File {
                read,
                write,
                append,
            },
        )?;
        drop(inner);
        if trunc && write && rec.kind == Kind::File && rec.size != 0 {
            let set = super::SetAttr {
                size: Some(0),
                ..Default::default()
            };
            if let Err(e) = self.setattr(owner, node, None, set) {
                let _ = self.release(owner, fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// Called with the state lock held, so the node cannot vanish in between.
    fn new_handle(&self, node: u64, owner: u64, kind: HandleKind) -> VfsResult<u64> {
        let fh = self.handles().insert(OpenHandle { node, owner, kind })?;
        self.refs().pin(node, 1);
        Ok(fh)
    }

    /// Create-and-open. With `O_EXCL` an existing name is EEXIST; otherwise the existing
    /// file is opened (and truncated with `O_TRUNC`). The entry is referenced for `owner`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        owner: u64,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
    ) -> VfsResult<(Attr, u64)> {
        self.create_node(owner, parent, name, mode, flags, uid, gid, None)
    }

    /// `create`, the new node getting the id `id` when given (reserved for `owner`).
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        owner: u64,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
        id: Option<u64>,
    ) -> VfsResult<(Attr, u64)> {
        check_name(name).map_err(|e| e.errno())?;
        let node = {
            let mut inner = self.write_lock()?;
            let node = match self.child(&inner, parent, name)? {
                Some(_) if flags as i32 & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(id) => id,
                None => {
                    let mode = libc::S_IFREG | (mode & 0o7777);
                    let new = NewNode {
                        kind: Kind::File,
                        mode,
                        rdev: 0,
                        uid,
                        gid,
                        id,
                    };
                    self.make_node_locked(&mut inner, parent, name, new)?.ino
                }
            };
            // Referenced before the lock goes, so an unlink cannot free it in between.
            self.refs().take(owner, node, 1);
            node
        };
        let opened = self
            .open(owner, node, flags)
            .and_then(|fh| Ok((self.attr(&self.state(), node)?, fh)));
        if opened.is_err() {
            self.forget(owner, node, 1);
        }
        opened
    }

    /// Sets `count` fresh node ids aside (the first is returned): no node is given one
    /// of them unless [`Vfs::create_as`] names it. Ids are never reused, so ids reserved
    /// and never used are simply skipped.
    pub fn reserve_ids(&self, count: u32) -> VfsResult<u64> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let mut inner = self.write_lock()?;
        let first = inner.overlay.state.next_id;
        inner.overlay.state.next_id = first.checked_add(count as u64).ok_or(Errno::ENOSPC)?;
        Ok(first)
    }

    /// An exclusive create-and-open whose node gets the reserved id `id` (the caller
    /// checks it was reserved for `owner`) and the contents `data`
    /// (docs/PROTOCOL.md §7.1 `create_as`). The entry is referenced for `owner`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_as(
        &self,
        owner: u64,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
        id: u64,
        data: &[u8],
    ) -> VfsResult<(Attr, u64)> {
        let excl = flags | libc::O_EXCL as u32;
        let (attr, fh) = self.create_node(owner, parent, name, mode, excl, uid, gid, Some(id))?;
        if data.is_empty() {
            return Ok((attr, fh));
        }
        let written = self.write(owner, fh, 0, data);
        match written.and_then(|_| self.attr(&self.state(), id)) {
            Ok(a) => Ok((a, fh)),
            Err(e) => {
                // The file stays (empty, or shorter), without the client's reference or
                // handle: the reply is the error.
                let _ = self.release(owner, fh);
                self.forget(owner, id, 1);
                Err(e)
            }
        }
    }

    pub fn opendir(&self, owner: u64, node: u64) -> VfsResult<u64> {
        let inner = self.state();
        self.dir_rec(&inner, node)?;
        self.new_handle(node, owner, HandleKind::Dir { listing: None })
    }

    /// Entries after `cookie` (0 = from the start, which also refreshes the listing):
    /// `.` (cookie 1), `..` (cookie 2), then the children as they were at the last
    /// refresh in the order of their name-derived cookies, each entry's own cookie being
    /// where the next page starts. A cookie from another listing of the directory (an
    /// earlier handle, the client's cache) resumes after the same name. Takes no
    /// references.
    pub fn readdir(&self, owner: u64, fh: u64, cookie: u64, max: u32) -> VfsResult<Vec<DirItem>> {
        let (node, cached) = {
            let handles = self.handles();
            let h = handles.get(owner, fh)?;
            match &h.kind {
                HandleKind::Dir { listing } => {
                    (h.node, if cookie == 0 { None } else { listing.clone() })
                }
                HandleKind::File { .. } => return Err(Errno::ENOTDIR),
            }
        };
        let inner = self.state();
        let keyed = match cached {
            Some(k) => k,
            None => {
                // A directory removed while open lists as empty.
                let l = self
                    .listing(&inner, node)
                    .unwrap_or_else(|_| Listing::Upper(Default::default()));
                let k = self.keyed(l);
                if let Ok(OpenHandle {
                    kind: HandleKind::Dir { listing },
                    ..
                }) = self.handles().get_mut(owner, fh)
                {
                    *listing = Some(k.clone());
                }
                k
            }
        };
        Ok(self.page(&inner, node, &keyed, cookie, max))
    }

    /// The whole listing of directory `node`, as `readdir` on a fresh handle from cookie
    /// 0 gives it, if it has at most `max` entries (`.` and `..` included) and
    /// `fits(count, name bytes)` of its children says yes; `Ok(None)` otherwise. Opens
    /// no handle and takes no references; its cost is bounded by what it returns (the
    /// count and name bytes are summed before any name is hashed).
    pub fn list_whole(
        &self,
        node: u64,
        max: u32,
        fits: impl FnOnce(usize, usize) -> bool,
    ) -> VfsResult<Option<Vec<DirItem>>> {
        let inner = self.state();
        let l = self.listing(&inner, node)?;
        let mut count = 0usize;
        let mut bytes = 0usize;
        while let Some((name, _)) = self.listing_entry(&l, count) {
            count += 1;
            bytes += name.len();
            if count + 2 > max as usize {
                return Ok(None);
            }
        }
        if !fits(count + 2, bytes + 3) {
            return Ok(None);
        }
        let keyed = self.keyed(l);
        Ok(Some(self.page(&inner, node, &keyed, 0, max)))
    }

    /// Up to `max` entries of a listing after `cookie` (`readdir`).
    fn page(&self, inner: &Inner, node: u64, keyed: &Keyed, cookie: u64, max: u32) -> Vec<DirItem> {
        let parent = if node == ROOT {
            ROOT
        } else {
            self.rec(inner, node).map_or(ROOT, |r| r.parent)
        };
        let mut out = Vec::new();
        let max = max.max(1) as usize;
        // Removed since the listing was taken: skipped.
        let item = |name: &[u8], id: u64, cookie: u64| {
            self.rec(inner, id).ok().map(|r| DirItem {
                name: name.to_vec(),
                node: id,
                kind: kind_bits(&r.kind, r.mode),
                cookie,
            })
        };
        if cookie == 0 {
            out.extend(item(b".", node, 1));
        }
        if cookie <= 1 && out.len() < max {
            out.extend(item(b"..", parent, 2));
        }
        let order = &keyed.order;
        let mut j = if cookie <= 2 {
            0
        } else {
            order.partition_point(|&(k, _)| k <= cookie)
        };
        let mut last = None;
        while let Some(&(key, i)) = order.get(j) {
            // Names whose cookies collide go in one page: a page ending between them
            // would resume past the rest.
            if out.len() >= max && last != Some(key) {
                break;
            }
            j += 1;
            if let Some((name, id)) = self.listing_entry(&keyed.listing, i as usize) {
                out.extend(item(name, id, key));
                last = Some(key);
            }
        }
        out
    }

    /// A listing in cookie order.
    fn keyed(&self, listing: Listing) -> Keyed {
        let mut order = Vec::new();
        let mut i = 0u32;
        while let Some((name, _)) = self.listing_entry(&listing, i as usize) {
            order.push((entry_cookie(name), i));
            i += 1;
        }
        order.sort_unstable();
        Keyed {
            listing,
            order: Arc::new(order),
        }
    }

    /// Attributes of the entries a readdirplus reply will carry, each (but `.` and `..`)
    /// referenced for `owner`; entries removed meanwhile are left out.
    pub fn entries_plus(&self, owner: u64, items: Vec<DirItem>) -> Vec<(DirItem, Attr)> {
        let inner = self.state();
        let mut out = Vec::with_capacity(items.len());
        let mut refs = Vec::new();
        for it in items {
            let Ok(attr) = self.attr(&inner, it.node) else {
                continue;
            };
            if it.name != b"." && it.name != b".." {
                refs.push(it.node);
            }
            out.push((it, attr));
        }
        let mut r = self.refs();
        for node in refs {
            r.take(owner, node, 1);
        }
        out
    }

    /// Closes a file handle (a directory handle here is EBADF).
    pub fn release(&self, owner: u64, fh: u64) -> VfsResult<()> {
        let h = self.handles().get(owner, fh)?.clone();
        if !matches!(h.kind, HandleKind::File { .. }) {
            return Err(Errno::EBADF);
        }
        self.close(owner, fh, false, h.node)
    }

    /// Closes a directory handle (a file handle here is EBADF).
    pub fn releasedir(&self, owner: u64, fh: u64) -> VfsResult<()> {
        let node = self.handles().get(owner, fh)?.node;
        self.close(owner, fh, true, node)
    }

    fn close(&self, owner: u64, fh: u64, dir: bool, node: u64) -> VfsResult<()> {
        self.handles().remove(owner, fh, dir)?;
        if self.refs().unpin(node, 1) {
            self.remove_if_orphan(node);
        }
        Ok(())
    }

    /// Makes the directory's entries (and every other metadata change) durable.
    pub fn fsyncdir(&self, owner: u64, fh: u64) -> VfsResult<()> {
        match self.handles().get(owner, fh)?.kind {
            HandleKind::Dir { .. } => {}
            HandleKind::File { .. } => return Err(Errno::ENOTDIR),
        }
        if self.read_only {
            return Ok(());
        }
        self.sync_journal().map_err(|e| errno_of(&e))
    }
}
