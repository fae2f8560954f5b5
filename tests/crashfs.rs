//! `crashfs`: a test-only FUSE file system that can lose power.
//!
//! Usage: `crashfs MOUNTPOINT CONTROL_SOCKET` (root: fuser mounts with mount(2)).
//!
//! Everything lives in memory, twice: the *live* state (what programs see) and the
//! *durable* state (what would be on the disk if the power went now). The durability
//! rules are the strictest POSIX allows, in the spirit of Jepsen's LazyFS, and at least
//! as strict as ext4 in its default `data=ordered` mode:
//!
//! - `fsync`/`fdatasync` of a file makes that inode's current contents, size and
//!   attributes durable. It does NOT make any name of the file durable.
//! - `fsync` of a directory (`fsyncdir`) makes that directory's entry list durable
//!   (each name and the inode it points to). An inode that becomes reachable that way
//!   and was never itself made durable comes into the durable state *empty* (a file of
//!   size 0, a directory with no entries) with its current attributes; an inode already
//!   durable keeps its last-synced contents. (ext4 can leave a created-but-never-fsynced
//!   file at length 0 after a crash even when its name survived; so can we.)
//! - Nothing else is ever durable: no rename, unlink, create, write or truncate becomes
//!   durable by itself or by the passing of time, unless the crash command asks for
//!   random write-back (below).
//!
//! A crash is a command on the control socket (one line, answered with one line):
//!
//! - `crash SEED PERMILLE`: unmount (the kernel's page, dentry and inode caches go with
//!   the super block, so nothing volatile survives), then model write-back that happened
//!   before the power went: with probability PERMILLE/1000 each inode (in inode order,
//!   decided by a PRNG seeded with SEED) gets the treatment of an fsync (files) or an
//!   fsyncdir (directories). Then the live state is replaced by the durable one (inodes no
//!   longer reachable from the root are gone, link counts recounted) and the file system
//!   is mounted again at the same place. Answers `ok` once the new mount is up. The
//!   caller must first stop every process that uses the mount (the unmount is not lazy).
//! - `writeback PATH` (relative to the mount): the kernel wrote that one inode back on
//!   its own, as an fsync (file) or fsyncdir (directory) would have.
//! - `stats`: `fsync=N fsyncdir=M crashes=K`.
//! - `exit`: unmounts and exits.
//!
//! Not modelled: torn writes inside one inode (write-back takes an inode whole, as of
//! the moment of the crash), ordering between inodes beyond the rules above, xattrs,
//! hard links, symlinks and device nodes (the hexz overlay uses none of them on its
//! directory), and disk-full errors.
//!
//! flock and POSIX locks are left to the kernel (crashfs does not negotiate
//! FUSE_FLOCK_LOCKS / FUSE_POSIX_LOCKS, so the kernel keeps them locally), which is all
//! the hexz overlay needs of them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const BLOCK: u64 = 4096;
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Body {
    /// Sparse data: 4 KiB blocks by block index; absent blocks read as zeros.
    File(BTreeMap<u64, Arc<Vec<u8>>>),
    Dir(BTreeMap<OsString, u64>),
}

#[derive(Clone)]
struct Inode {
    body: Body,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Inode {
    fn new(body: Body, mode: u32, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            body,
            size: 0,
            mode,
            uid,
            gid,
            nlink: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    /// The same inode with no contents (what a never-synced inode is on the disk).
    fn emptied(&self) -> Inode {
        let mut i = self.clone();
        i.size = 0;
        i.body = match &self.body {
            Body::File(_) => Body::File(BTreeMap::new()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
        };
        i
    }

    fn entries(&self) -> Option<&BTreeMap<OsString, u64>> {
        match &self.body {
            Body::Dir(e) => Some(e),
            Body::File(_) => None,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let kind = match self.body {
            Body::Dir(_) => FileType::Directory,
            Body::File(_) => FileType::RegularFile,
        };
        let blocks = match &self.body {
            Body::File(b) => b.len() as u64 * (BLOCK / 512),
            Body::Dir(_) => 0,
        };
        FileAttr {
            ino: INodeNo(ino),
            size: self.size,
            blocks,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind,
            perm: (self.mode & 0o7777) as u16,
            nlink: if kind == FileType::Directory {
                2
            } else {
                self.nlink
            },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    /// Sets the length; bytes past it are forgotten (so a later extension reads zeros).
    fn truncate(&mut self, size: u64) {
        if let Body::File(blocks) = &mut self.body {
            blocks.split_off(&size.div_ceil(BLOCK));
            let tail = (size % BLOCK) as usize;
            if tail != 0 {
                if let Some(b) = blocks.get_mut(&(size / BLOCK)) {
                    Arc::make_mut(b)[tail..].fill(0);
                }
            }
        }
        self.size = size;
    }
}

#[derive(Default)]
struct Stats {
    fsync: u64,
    fsyncdir: u64,
    crashes: u64,
}

struct State {
    live: HashMap<u64, Inode>,
    durable: HashMap<u64, Inode>,
    next_ino: u64,
    stats: Stats,
}

impl State {
    fn new() -> State {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut root = Inode::new(Body::Dir(BTreeMap::new()), 0o755, uid, gid);
        root.nlink = 2;
        let live = HashMap::from([(ROOT, root)]);
        State {
            durable: live.clone(),
            live,
            next_ino: ROOT + 1,
            stats: Stats::default(),
        }
    }

    fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        self.live.get(&ino).ok_or(Errno::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.live.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        self.get(ino)?.entries().ok_or(Errno::ENOTDIR)
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::Dir(e) => Ok(e),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(i) = self.live.get_mut(&ino) {
            let now = SystemTime::now();
            i.mtime = now;
            i.ctime = now;
        }
    }

    /// Adds a new inode under `parent/name`.
    fn make(&mut self, parent: u64, name: &OsStr, mut inode: Inode) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        inode.nlink = 1;
        self.live.insert(ino, inode);
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        self.touch(parent);
        Ok(ino)
    }

    /// Removes one name. The inode itself stays (open handles may still use it) until
    /// the next crash, which keeps only what is reachable.
    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (self.get(ino)?.entries(), want_dir) {
            (Some(e), true) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
            (Some(_), false) => return Err(Errno::EISDIR),
            (None, true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        self.touch(parent);
        let i = self.get_mut(ino)?;
        i.nlink = i.nlink.saturating_sub(1);
        i.ctime = SystemTime::now();
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        if let Ok(old) = self.lookup(newparent, newname) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            let is_dir = self.get(old)?.entries().is_some();
            if is_dir != self.get(ino)?.entries().is_some() {
                return Err(if is_dir {
                    Errno::EISDIR
                } else {
                    Errno::ENOTDIR
                });
            }
            self.remove(newparent, newname, is_dir)?;
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(newparent)?.insert(newname.to_owned(), ino);
        self.touch(parent);
        self.touch(newparent);
        Ok(())
    }

    fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let i = self.get(ino)?;
        let Body::File(blocks) = &i.body else {
            return Err(Errno::EISDIR);
        };
        let end = off.saturating_add(size as u64).min(i.size);
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        let mut pos = off;
        while pos < end {
            let n = (BLOCK - pos % BLOCK).min(end - pos);
            if let Some(b) = blocks.get(&(pos / BLOCK)) {
                let at = (pos % BLOCK) as usize;
                let dst = (pos - off) as usize;
                out[dst..dst + n as usize].copy_from_slice(&b[at..at + n as usize]);
            }
            pos += n;
        }
        Ok(out)
    }

    fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> Result<u32, Errno> {
        let end = off.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        let i = self.get_mut(ino)?;
        let Body::File(blocks) = &mut i.body else {
            return Err(Errno::EISDIR);
        };
        let mut pos = off;
        while pos < end {
            let n = (BLOCK - pos % BLOCK).min(end - pos);
            let b = blocks
                .entry(pos / BLOCK)
                .or_insert_with(|| Arc::new(vec![0; BLOCK as usize]));
            let at = (pos % BLOCK) as usize;
            let src = (pos - off) as usize;
            Arc::make_mut(b)[at..at + n as usize].copy_from_slice(&data[src..src + n as usize]);
            pos += n;
        }
        i.size = i.size.max(end);
        self.touch(ino);
        Ok(data.len() as u32)
    }

    /// fsync of a file: its contents and attributes as they are now.
    fn sync_file(&mut self, ino: u64) -> Result<(), Errno> {
        let i = self.get(ino)?.clone();
        if i.entries().is_some() {
            return self.sync_dir(ino);
        }
        self.durable.insert(ino, i);
        Ok(())
    }

    /// fsyncdir: the entry list as it is now; newly reachable inodes come in empty.
    fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let live = self.get(ino)?.clone();
        let entries = live.entries().ok_or(Errno::ENOTDIR)?.clone();
        match self.durable.get_mut(&ino) {
            Some(d) => d.body = Body::Dir(entries.clone()),
            None => {
                self.durable.insert(ino, live);
            }
        }
        for child in entries.values() {
            if !self.durable.contains_key(child) {
                let empty = self.get(*child)?.emptied();
                self.durable.insert(*child, empty);
            }
        }
        Ok(())
    }

    /// Power loss: optional random write-back, then only the durable state remains.
    fn crash(&mut self, seed: u64, permille: u64) {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut inos: Vec<u64> = self.live.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if permille > 0 && rng % 1000 < permille {
                let _ = self.sync_file(ino);
            }
        }
        // Keep what the root reaches; recount links.
        let mut keep: HashMap<u64, Inode> = HashMap::new();
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            let Some(i) = self.durable.get(&ino) else {
                continue;
            };
            if keep.insert(ino, i.clone()).is_some() {
                continue;
            }
            for child in i.entries().into_iter().flat_map(|e| e.values()) {
                *links.entry(*child).or_default() += 1;
                todo.push(*child);
            }
        }
        for (ino, i) in keep.iter_mut() {
            i.nlink = links.get(ino).copied().unwrap_or(2);
        }
        self.durable = keep;
        self.live = self.durable.clone();
        self.stats.crashes += 1;
    }
}

#[derive(Clone)]
struct CrashFs(Arc<Mutex<State>>);

impl CrashFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply_entry(st: &State, r: Result<u64, Errno>, reply: ReplyEntry) {
    match r.and_then(|ino| Ok(st.get(ino)?.attr(ino))) {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for CrashFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.state();
        let r = st.lookup(parent.0, name);
        reply_entry(&st, r, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().get(ino.0) {
            Ok(i) => reply.attr(&TTL, &i.attr(ino.0)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.state();
        let r = st.get_mut(ino.0).and_then(|i| {
            if let Some(size) = size {
                if i.entries().is_some() {
                    return Err(Errno::EISDIR);
                }
                i.truncate(size);
                i.mtime = SystemTime::now();
            }
            if let Some(m) = mode {
                i.mode = m;
            }
            i.uid = uid.unwrap_or(i.uid);
            i.gid = gid.unwrap_or(i.gid);
            if let Some(t) = atime {
                i.atime = time(t);
            }
            if let Some(t) = mtime {
                i.mtime = time(t);
            }
            i.ctime = SystemTime::now();
            Ok(i.attr(ino.0))
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.state();
        let inode = Inode::new(
            Body::Dir(BTreeMap::new()),
            mode & !umask,
            req.uid(),
            req.gid(),
        );
        let r = st.make(parent.0, name, inode);
        reply_entry(&st, r, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.state();
        let inode = Inode::new(
            Body::File(BTreeMap::new()),
            mode & !umask,
            req.uid(),
            req.gid(),
        );
        match st
            .make(parent.0, name, inode)
            .and_then(|ino| Ok(st.get(ino)?.attr(ino)))
        {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.state().remove(parent.0, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.state().remove(parent.0, name, true), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .state()
            .rename(parent.0, name, newparent.0, newname, flags);
        reply_empty(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().get(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        st.stats.fsync += 1;
        let r = st.sync_file(ino.0);
        reply_empty(r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
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
        let st = self.state();
        let entries = match st.dir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        // Offsets: 1 and 2 for `.` and `..`, then 3 + position (stable within a mount
        // as long as nobody changes the directory during the listing, which is enough here).
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (ino.0, FileType::Directory, OsStr::new("..")),
        ];
        let rest = entries.iter().map(|(name, child)| {
            let kind = match st.live.get(child).map(|i| &i.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (*child, kind, name.as_os_str())
        });
        for (n, (child, kind, name)) in dots
            .into_iter()
            .chain(rest)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), n as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        st.stats.fsyncdir += 1;
        let r = st.sync_dir(ino.0);
        reply_empty(r, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.state().live.len() as u64;
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            files + 1_000_000,
            1_000_000,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

fn mount(fs: &CrashFs, mnt: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("crashfs".into()),
        MountOption::Subtype("crashfs".into()),
    ];
    config.acl = fuser::SessionACL::All;
    fuser::Session::new(fs.clone(), mnt, &config)?.spawn()
}

/// Unmounts and waits for the session to end. How the session ends is not an error
/// (the kernel may report the connection as aborted rather than gone); a mount still in
/// place is.
fn unmount(session: Option<fuser::BackgroundSession>, mnt: &Path) -> std::io::Result<()> {
    let ended = session.map_or(Ok(()), |s| s.umount_and_join());
    let want = mnt.to_string_lossy();
    let still = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*want));
    match ended {
        Err(e) if still => Err(e),
        _ if still => Err(std::io::Error::other("still mounted")),
        _ => Ok(()),
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [mnt, control] = args.as_slice() else {
        eprintln!("usage: crashfs MOUNTPOINT CONTROL_SOCKET");
        std::process::exit(2);
    };
    if let Err(e) = run(mnt, control) {
        eprintln!("crashfs: {e}");
        std::process::exit(1);
    }
}

fn run(mnt: &Path, control: &Path) -> std::io::Result<()> {
    let mnt = &std::fs::canonicalize(mnt)?;
    let fs = CrashFs(Arc::new(Mutex::new(State::new())));
    let mut session = Some(mount(&fs, mnt)?);
    let _ = std::fs::remove_file(control);
    // Bound only once mounted: a caller that can connect finds the mount up.
    let listener = UnixListener::bind(control)?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["crash", seed, permille] => {
                match (seed.parse::<u64>(), permille.parse::<u64>()) {
                    (Ok(seed), Ok(permille)) => {
                        // Only a clean unmount drops the kernel's caches; without one the
                        // crash is not made (the caller has left something using the mount).
                        let unmounted = unmount(session.take(), mnt);
                        let remounted = unmounted.and_then(|()| {
                            fs.state().crash(seed, permille);
                            mount(&fs, mnt)
                        });
                        match remounted {
                            Ok(s) => {
                                session = Some(s);
                                "ok".to_string()
                            }
                            Err(e) => format!("error: remount: {e}"),
                        }
                    }
                    _ => "error: crash SEED PERMILLE".to_string(),
                }
            }
            ["writeback", path] => {
                let mut st = fs.state();
                let found = Path::new(path)
                    .iter()
                    .try_fold(ROOT, |dir, name| st.lookup(dir, name));
                match found.and_then(|ino| st.sync_file(ino)) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error: {path}: {e:?}"),
                }
            }
            ["stats"] => {
                let st = fs.state();
                format!(
                    "fsync={} fsyncdir={} crashes={}",
                    st.stats.fsync, st.stats.fsyncdir, st.stats.crashes
                )
            }
            ["exit"] => {
                let r = unmount(session.take(), mnt);
                let _ = writeln!(
                    conn,
                    "{}",
                    r.map_or_else(|e| format!("error: {e}"), |()| "ok".into())
                );
                let _ = std::fs::remove_file(control);
                return Ok(());
            }
            _ => format!("error: unknown command {line:?}"),
        };
        let _ = writeln!(conn, "{answer}");
    }
    Ok(())
}
