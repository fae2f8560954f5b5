//! File data through the merged view. A lower-backed file gets a sparse upper file of the
//! same length on its first change; writes go there in whole 4 KiB blocks (edges filled
//! from the merged view) and the written ranges are recorded, so a 4 KiB write into a
//! 1 GiB snapshot file costs that write, not a copy. Reads take each range from wherever
//! it lives: upper file, snapshot (below `lower_limit`), or zeros.
//!
//! Writes and truncations of one file are serialized by its data lock; the state lock is
//! held only to read where the bytes are and to record what changed, never across I/O.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hexz_protocol::message::{SEEK_DATA, SEEK_HOLE};
use hexz_protocol::Errno;

use super::handles::HandleKind;
use super::{errno_of, io_errno, now, Inner, Vfs, VfsResult, BLOCK};
use crate::error::Error;
use crate::overlay::journal::{Kind, Record};
use crate::overlay::ranges::RangeSet;
use crate::snapshot::NodeKind;

/// Largest file the overlay accepts (the kernel's own limit for most file systems).
const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Upper files kept open at once; the cache is cleared past this.
const MAX_OPEN_UPPER: usize = 512;

/// Where a file's bytes are, captured under the lock so the I/O can happen outside it.
struct DataView {
    size: u64,
    lower: Option<u32>,
    lower_limit: u64,
    present: Option<Arc<RangeSet>>,
    upper: Option<Arc<File>>,
}

impl Vfs {
    /// The node's upper file, opened once and cached; `create` makes a new, empty one.
    fn upper_file(&self, id: u64, create: bool) -> VfsResult<Option<Arc<File>>> {
        if !create {
            if let Some(f) = self.files_lock().get(&id) {
                return Ok(Some(f.clone()));
            }
        }
        let path = self.data_dir.join(format!("{id:016x}"));
        let f = match OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .create(create)
            .truncate(create)
            .open(&path)
        {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(io_errno(e)),
        };
        let mut files = self.files_lock();
        if files.len() >= MAX_OPEN_UPPER {
            files.clear();
        }
        files.insert(id, f.clone());
        Ok(Some(f))
    }

    /// Where the node's bytes are now. Takes the state lock briefly; opens the upper
    /// file (if not cached) after releasing it.
    fn view(&self, id: u64) -> VfsResult<DataView> {
        let (rec, present) = {
            let inner = self.state();
            let rec = self.rec(&inner, id)?;
            let present = inner.overlay.state.present.get(&id).cloned();
            (rec, present)
        };
        match rec.kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        let upper = if rec.upper {
            self.upper_file(id, false)?
        } else {
            None
        };
        Ok(DataView {
            size: rec.size,
            lower: rec.lower,
            lower_limit: rec.lower_limit,
            present,
            upper,
        })
    }

    /// The node of `owner`'s file handle `fh`, with the access it was opened for.
    fn file_handle(&self, owner: u64, fh: u64) -> VfsResult<(u64, bool, bool, bool)> {
        let handles = self.handles();
        let h = handles.get(owner, fh)?;
        match h.kind {
            HandleKind::File {
                read,
                write,
                append,
            } => Ok((h.node, read, write, append)),
            HandleKind::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    /// Reads `[off, off + len)` of the merged file into a new buffer (short at EOF).
    fn read_view(&self, v: &DataView, off: u64, len: u64) -> VfsResult<Vec<u8>> {
        let end = off.saturating_add(len).min(v.size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - off) as usize];
        let lower_data = match v.lower.and_then(|i| self.snap.node(i)).map(|n| &n.kind) {
            Some(NodeKind::File(d)) => Some(d),
            _ => None,
        };
        let Some(lower) = lower_data else {
            if let Some(f) = &v.upper {
                read_full(f, &mut buf, off)?;
            }
            return Ok(buf);
        };
        let empty = RangeSet::new();
        let present = v.present.as_deref().unwrap_or(&empty);
        let mut pos = off;
        while pos < end {
            let at = (pos - off) as usize;
            if let Some((_, e)) = present.containing(pos) {
                let n = (e.min(end) - pos) as usize;
                let f = v.upper.as_ref().ok_or(Errno::EIO)?;
                read_full(f, &mut buf[at..at + n], pos)?;
                pos += n as u64;
            } else {
                let next = present.next_after(pos).map_or(end, |(s, _)| s.min(end));
                let lower_end = next.min(v.lower_limit);
                if pos < lower_end {
                    let n = (lower_end - pos) as usize;
                    self.snap
                        .read_at(lower, pos, &mut buf[at..at + n])
                        .map_err(|e| errno_of(&e))?;
                }
                pos = next;
            }
        }
        Ok(buf)
    }

    pub fn read(&self, owner: u64, fh: u64, off: u64, size: u32) -> VfsResult<Vec<u8>> {
        let (node, read, _, _) = self.file_handle(owner, fh)?;
        if !read {
            return Err(Errno::EBADF);
        }
        let view = self.view(node)?;
        self.read_view(&view, off, size as u64)
    }

    /// The whole contents of a regular file no longer than `max` bytes (`Err(size)` for
    /// a longer one, unread), read without a handle: one consistent view, as a read at
    /// offset 0 of its full length would return.
    pub fn read_whole(&self, node: u64, max: u64) -> VfsResult<Result<Vec<u8>, u64>> {
        let view = self.view(node)?;
        if view.size > max {
            return Ok(Err(view.size));
        }
        self.read_view(&view, 0, view.size).map(Ok)
    }

    /// A read answered from memory (snapshot data already in the frame cache), or `None`
    /// when it might wait for a disk.
    pub fn read_cached(
        &self,
        owner: u64,
        fh: u64,
        off: u64,
        size: u32,
    ) -> Option<VfsResult<Vec<u8>>> {
        let node = match self.file_handle(owner, fh) {
            Ok((node, true, _, _)) => node,
            Ok(_) => return Some(Err(Errno::EBADF)),
            Err(e) => return Some(Err(e)),
        };
        let (size_now, idx) = {
            let inner = self.state();
            match self.rec(&inner, node) {
                Ok(r) if r.kind == Kind::File && !r.upper => (r.size, r.lower?),
                Ok(_) => return None,
                Err(e) => return Some(Err(e)),
            }
        };
        let Some(NodeKind::File(d)) = self.snap.node(idx).map(|n| &n.kind) else {
            return None;
        };
        let end = off.saturating_add(size as u64).min(size_now);
        if off >= end {
            return Some(Ok(Vec::new()));
        }
        let mut buf = vec![0u8; (end - off) as usize];
        match self.snap.read_at_cached(d, off, &mut buf)? {
            Ok(n) => {
                buf.truncate(n);
                Some(Ok(buf))
            }
            Err(e) => Some(Err(errno_of(&e))),
        }
    }

    /// The node's upper file, creating it (sparse, the file's length) and journaling that
    /// on first need. The caller holds the node's data lock.
    fn ensure_upper(&self, node: u64) -> VfsResult<Arc<File>> {
        let rec = self.rec(&self.state(), node)?;
        if rec.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        if rec.upper {
            if let Some(f) = self.upper_file(node, false)? {
                return Ok(f);
            }
        }
        self.dirty().insert(node);
        let f = self.upper_file(node, true)?.ok_or(Errno::EIO)?;
        f.set_len(rec.size).map_err(io_errno)?;
        self.data_dir_changes.fetch_add(1, Ordering::AcqRel);
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        rec.upper = true;
        self.commit(&mut inner, vec![Record::Node(rec)])?;
        Ok(f)
    }

    /// Tracks how many bytes the node's upper file takes (for `--overlay-size`).
    fn account_upper(&self, node: u64, f: &File) {
        let Ok(m) = f.metadata() else { return };
        let now = m.blocks() * 512;
        let old = self
            .upper_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, now);
        match old {
            Some(old) if now >= old => {
                self.upper_bytes.fetch_add(now - old, Ordering::Relaxed);
            }
            Some(old) => {
                let d = (old - now).min(self.upper_bytes.load(Ordering::Relaxed));
                self.upper_bytes.fetch_sub(d, Ordering::Relaxed);
            }
            // First sight: the total measured at open already counts what it had.
            None => {}
        }
    }

    pub fn write(&self, owner: u64, fh: u64, off: u64, data: &[u8]) -> VfsResult<u32> {
        let (node, _, write, append) = self.file_handle(owner, fh)?;
        if !write {
            return Err(Errno::EBADF);
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        self.check_space(data.len() as u64)?;
        let _data = self.node_lock(node);
        self.write_locked(node, off, data, append)
    }

    /// A write with the node's data lock held.
    fn write_locked(&self, node: u64, off: u64, data: &[u8], append: bool) -> VfsResult<u32> {
        let f = self.ensure_upper(node)?;
        let known = self
            .upper_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&node);
        if !known {
            // First sight: remember the size before this write, so it counts.
            self.account_upper(node, &f);
        }
        let view = self.view(node)?;
        let off = if append { view.size } else { off };
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(Errno::EFBIG)?;
        let mut block = None;
        if view.lower.is_some() {
            // Whole blocks, so every block in the upper file is either absent or complete.
            let a = off - off % BLOCK;
            let b = end.div_ceil(BLOCK) * BLOCK;
            let b = end.max(b.min(view.size));
            let mut buf = self.read_view(&view, a, off - a)?;
            buf.resize((off - a) as usize, 0);
            buf.extend_from_slice(data);
            if b > end {
                let tail = self.read_view(&view, end, b - end)?;
                buf.extend_from_slice(&tail);
                buf.resize((b - a) as usize, 0);
            }
            f.write_all_at(&buf, a).map_err(io_errno)?;
            block = Some((a, b));
        } else {
            f.write_all_at(data, off).map_err(io_errno)?;
        }
        self.account_upper(node, &f);
        self.dirty().insert(node);
        let mut inner = self.write_lock()?;
        self.data_change(&mut inner, node);
        if let Some((a, b)) = block {
            let p = inner.overlay.state.present.entry(node).or_default();
            if Arc::make_mut(p).insert(a, b) {
                inner.pending_present.entry(node).or_default().push((a, b));
            }
        }
        let t = now();
        if let Some(r) = inner.overlay.state.nodes.get_mut(&node) {
            r.size = r.size.max(end);
            r.mtime = t;
            r.ctime = t;
        }
        Ok(data.len() as u32)
    }

    /// Marks the start of unjournaled data changes of `node` (before the in-memory record
    /// changes): remembers its journaled size for the records written meanwhile.
    fn data_change(&self, inner: &mut Inner, node: u64) {
        if let Some(r) = inner.overlay.state.nodes.get(&node) {
            let at = (r.size, r.lower_limit);
            inner.durable.entry(node).or_insert(at);
        }
        inner.pending_present.entry(node).or_default();
    }

    /// Sets a file's length (the caller holds its data lock and journals its attributes).
    pub(super) fn truncate(&self, node: u64, size: u64) -> VfsResult<()> {
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let f = self.ensure_upper(node)?;
        self.dirty().insert(node);
        f.set_len(size).map_err(io_errno)?;
        self.account_upper(node, &f);
        let mut inner = self.write_lock()?;
        self.data_change(&mut inner, node);
        if let Some(r) = inner.overlay.state.nodes.get_mut(&node) {
            r.lower_limit = r.lower_limit.min(size);
            r.size = size;
        }
        if let Some(p) = inner.overlay.state.present.get_mut(&node) {
            Arc::make_mut(p).truncate(size);
        }
        Ok(())
    }

    /// The records of `id`'s unjournaled data state (present ranges, then the node with
    /// its live size): only once its upper file is durable.
    pub(super) fn take_data_records(&self, inner: &mut Inner, id: u64) -> Vec<Record> {
        inner.durable.remove(&id);
        let Some(ranges) = inner.pending_present.remove(&id) else {
            return Vec::new();
        };
        let mut records: Vec<Record> = ranges
            .into_iter()
            .map(|(start, end)| Record::Present { id, start, end })
            .collect();
        if let Some(rec) = inner.overlay.state.nodes.get(&id) {
            records.push(Record::Node(rec.clone()));
        }
        records
    }

    /// Data reaches the journal only through `fsync` (see the module doc), so a flush
    /// checks the handle and has nothing else to do.
    pub fn flush(&self, owner: u64, fh: u64) -> VfsResult<()> {
        self.file_handle(owner, fh).map(|_| ())
    }

    /// Makes the file's data and the metadata that reaches it durable: upper data, then
    /// the data directory's entries, then the journal records naming them. Concurrent
    /// callers share the directory and journal syncs (group commit), and none returns
    /// before everything it depends on is durable.
    pub fn fsync(&self, owner: u64, fh: u64, _datasync: bool) -> VfsResult<()> {
        let (node, ..) = self.file_handle(owner, fh)?;
        if self.read_only {
            return Ok(());
        }
        // No write of this file may land between syncing its data and journaling it.
        let _data = self.node_lock(node);
        let upper = self.rec(&self.state(), node)?.upper;
        if upper {
            if let Some(f) = self.upper_file(node, false)? {
                self.dirty().remove(&node);
                if let Err(e) = f.sync_all() {
                    self.dirty().insert(node);
                    return Err(io_errno(e));
                }
            }
        }
        let target = self.data_dir_changes.load(Ordering::Acquire);
        self.data_dir_sync
            .sync_to(target, || {
                let reached = self.data_dir_changes.load(Ordering::Acquire);
                File::open(&self.data_dir)?.sync_all()?;
                Ok(reached)
            })
            .map_err(io_errno)?;
        {
            let mut inner = self.write_lock()?;
            let records = self.take_data_records(&mut inner, node);
            if !records.is_empty() {
                self.commit(&mut inner, records)?;
            }
        }
        self.sync_journal().map_err(|e| errno_of(&e))
    }

    /// Makes everything journaled so far durable (one sync for many concurrent callers).
    pub(super) fn sync_journal(&self) -> crate::Result<()> {
        let Some((target, _)) = self.state().overlay.sync_point() else {
            return Ok(());
        };
        self.journal_sync
            .sync_to(target, || {
                let Some((reached, file)) = self.state().overlay.sync_point() else {
                    return Ok(target);
                };
                file.sync_data()?;
                Ok(reached)
            })
            .map_err(|e| Error::io("overlay journal", e))
    }

    /// `fallocate`: mode 0 and KEEP_SIZE reserve space (extending the size for mode 0);
    /// PUNCH_HOLE|KEEP_SIZE makes the range a hole that reads as zeros (whole blocks are
    /// punched in the upper file, never written; only partial edge blocks are written).
    pub fn fallocate(&self, owner: u64, fh: u64, off: u64, len: u64, mode: u32) -> VfsResult<()> {
        const KEEP_SIZE: u32 = libc::FALLOC_FL_KEEP_SIZE as u32;
        const PUNCH_HOLE: u32 = libc::FALLOC_FL_PUNCH_HOLE as u32;
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE && len > 0)
            .ok_or(Errno::EINVAL)?;
        let (node, _, write, _) = self.file_handle(owner, fh)?;
        if !write {
            return Err(Errno::EBADF);
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        if mode != 0 && mode != KEEP_SIZE && mode != PUNCH_HOLE | KEEP_SIZE {
            return Err(Errno::EOPNOTSUPP);
        }
        let _data = self.node_lock(node);
        let size = self.rec(&self.state(), node)?.size;
        if mode != PUNCH_HOLE | KEEP_SIZE {
            if mode == 0 && end > size {
                self.check_space(end - size)?;
                self.truncate(node, end)?;
                let mut inner = self.write_lock()?;
                let mut rec = self.rec(&inner, node)?;
                rec.ctime = now();
                rec.mtime = rec.ctime;
                self.commit(&mut inner, vec![Record::Node(rec)])?;
            }
            return Ok(());
        }
        let end = end.min(size);
        if off >= end {
            return Ok(());
        }
        // Partial blocks at the edges are written as zeros; whole blocks become holes.
        let a = off.div_ceil(BLOCK) * BLOCK;
        let b = end - end % BLOCK;
        // Without a whole block inside, the range spans at most two partial blocks.
        let zeros = vec![0u8; 2 * BLOCK as usize];
        if a >= b {
            self.write_locked(node, off, &zeros[..(end - off) as usize], false)?;
            return Ok(());
        }
        if off < a {
            self.write_locked(node, off, &zeros[..(a - off) as usize], false)?;
        }
        if b < end {
            self.write_locked(node, b, &zeros[..(end - b) as usize], false)?;
        }
        let f = self.ensure_upper(node)?;
        punch_hole(&f, a, b - a).map_err(io_errno)?;
        self.account_upper(node, &f);
        self.dirty().insert(node);
        let mut inner = self.write_lock()?;
        self.data_change(&mut inner, node);
        let is_lower = self.rec(&inner, node)?.lower.is_some();
        if is_lower {
            // The hole stands for these blocks now, not the snapshot's bytes.
            let p = inner.overlay.state.present.entry(node).or_default();
            if Arc::make_mut(p).insert(a, b) {
                inner.pending_present.entry(node).or_default().push((a, b));
            }
        }
        let t = now();
        if let Some(r) = inner.overlay.state.nodes.get_mut(&node) {
            r.mtime = t;
            r.ctime = t;
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE over the merged file.
    pub fn lseek(&self, owner: u64, fh: u64, off: u64, whence: u32) -> VfsResult<u64> {
        let (node, ..) = self.file_handle(owner, fh)?;
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return Err(Errno::EINVAL);
        }
        let v = self.view(node)?;
        if off >= v.size {
            return Err(Errno::ENXIO);
        }
        // Data ranges: upper present ranges, lower extents below lower_limit, or (for a
        // file with no snapshot origin) whatever the upper file reports.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        match v.lower.and_then(|i| self.snap.node(i)).map(|n| &n.kind) {
            Some(NodeKind::File(d)) => {
                for e in &d.extents {
                    let len = self.snap.index().chunks[e.chunk as usize].len as u64;
                    let end = (e.offset + len).min(v.lower_limit);
                    if e.offset < end {
                        ranges.push((e.offset, end));
                    }
                }
                if let Some(p) = &v.present {
                    ranges.extend(p.iter());
                }
            }
            _ => {
                if let Some(f) = &v.upper {
                    ranges.extend(upper_data_ranges(f, v.size));
                }
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        match whence {
            SEEK_DATA => merged
                .iter()
                .find(|(_, e)| *e > off)
                .map(|(s, _)| (*s).max(off))
                .filter(|&p| p < v.size)
                .ok_or(Errno::ENXIO),
            SEEK_HOLE => {
                let hole = merged
                    .iter()
                    .find(|(s, e)| *s <= off && off < *e)
                    .map_or(off, |(_, e)| *e);
                Ok(hole.min(v.size))
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> VfsResult<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break, // past the upper file's end: zeros
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_errno(e)),
        }
    }
    Ok(())
}

fn upper_data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let s = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if s < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                return vec![(0, size)];
            }
            break;
        }
        // SAFETY: as above.
        let e = unsafe { libc::lseek(fd, s, libc::SEEK_HOLE) };
        let e = if e < 0 { size as i64 } else { e };
        out.push((s as u64, (e as u64).min(size)));
        pos = e as u64;
    }
    out
}
