//! A stream-only snapshot mounted: each raw stream (`disk`, `memory`, ...) is a regular
//! file at the root of the mount, named after it, of the stream's fixed size. Read-only
//! by default; with `--rw` writes go to a block overlay (`<overlay>/<stream>.cow`, the
//! same copy-on-write device the NBD server and `run --disk` use) and are durable on
//! fsync, so `qemu-system-x86_64 -drive file=MNT/disk,format=raw` boots from it.
//!
//! This is not the tree's filesystem (that is the shared adapter over the VFS core): a
//! stream has no names, links or metadata of its own, only bytes, so the whole file
//! system is a directory of fixed-size files over [`BlockDevice`]s.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};

use crate::blockdev::BlockDevice;

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(3600);

/// One stream shown as the file `name`.
pub struct StreamFile {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
}

pub struct StreamFs {
    files: Vec<StreamFile>,
    /// Mounted read-only: every write is EROFS whatever the device allows.
    read_only: bool,
    uid: u32,
    gid: u32,
    /// When the mount was made: the files' times.
    since: SystemTime,
}

impl StreamFs {
    pub fn new(files: Vec<StreamFile>, read_only: bool, uid: u32, gid: u32) -> StreamFs {
        StreamFs {
            files,
            read_only,
            uid,
            gid,
            since: SystemTime::now(),
        }
    }

    fn file(&self, ino: INodeNo) -> Option<&StreamFile> {
        let i = ino.0.checked_sub(ROOT + 1)?;
        self.files.get(usize::try_from(i).ok()?)
    }

    fn ro(&self, f: &StreamFile) -> bool {
        self.read_only || f.dev.read_only()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            let f = self.file(INodeNo(ino))?;
            let perm = if self.ro(f) { 0o444 } else { 0o644 };
            (FileType::RegularFile, perm, f.dev.size(), 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.since,
            mtime: self.since,
            ctime: self.since,
            crtime: self.since,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno(e: &crate::Error) -> fuser::Errno {
    tracing::warn!("stream I/O: {e}");
    fuser::Errno::EIO
}

impl Filesystem for StreamFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent.0 == ROOT)
            .then(|| self.files.iter().position(|f| OsStr::new(&f.name) == name))
            .flatten();
        match found.and_then(|i| self.attr(ROOT + 1 + i as u64)) {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(fuser::Errno::ENOTDIR);
        }
        let mut all = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        for (i, f) in self.files.iter().enumerate() {
            all.push((ROOT + 1 + i as u64, FileType::RegularFile, f.name.clone()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::EISDIR);
        };
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if writes && self.ro(f) {
            return reply.error(fuser::Errno::EROFS);
        }
        if flags.0 & libc::O_TRUNC != 0 && f.dev.size() > 0 {
            return reply.error(fuser::Errno::EINVAL); // a stream's size is fixed
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::EISDIR);
        };
        let end = offset.saturating_add(size as u64).min(f.dev.size());
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match f.dev.read(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::EISDIR);
        };
        if self.ro(f) {
            return reply.error(fuser::Errno::EROFS);
        }
        // A stream cannot grow: past its end is no space.
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= f.dev.size() => {}
            _ => return reply.error(fuser::Errno::ENOSPC),
        }
        match f.dev.write(offset, data, false) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(ino).map(|f| f.dev.flush()) {
            Some(Ok(())) | None => reply.ok(),
            Some(Err(e)) => reply.error(errno(&e)),
        }
    }
}
