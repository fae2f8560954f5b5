//! FUSE requests in, protocol requests out. No filesystem semantics live here: the VFS
//! behind the transport decides everything; this file translates types and keeps the
//! handle table that lets open files survive a reconnect (of a transport that can lose
//! its server).
//!
//! Caching (why it is safe, and when it would not be): the snapshot never changes and the
//! overlay changes only through this mount, so the kernel may keep entries, attributes,
//! negative lookups and file pages for the TTLs the server gives (FOPEN_KEEP_CACHE), and
//! may cache writes (writeback, when enabled). If anything else changed the overlay while
//! mounted (a second client, a host process), this mount would show stale data until the
//! TTLs expire; an overlay has one writer at a time (its lock) for that reason.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use hexz_protocol::{
    Attr, DirEntryPlus, Errno, Op, ReadAt, ReplyBody, SetTime, Timespec, CAP_LIST_DIRS,
    CAP_READ_FILES, CAP_WRITE_BEHIND, MAX_LIST_DIRS,
};

use crate::ahead::{Ahead, Listed};
use crate::attrs::{AttrCache, CAPS_XATTR};
use crate::behind::{Behind, MAX_FIRST_DATA};
use crate::dirlook::{Answer, DirLook, Held};
use crate::names::Names;
use crate::prelist::{Page, Prelist};
use crate::workers::Workers;

/// Threads sending read-ahead requests (each waits for its reply): how many are in
/// flight at once, small files and listings together.
const READ_AHEAD_THREADS: usize = 4;
use crate::transport::{CallError, Transport};

/// A handle on the host, valid only on the connection (`epoch`) that opened it. Everyone
/// using it holds the `Arc`; it is released on the host when the last holder lets go, so
/// neither eviction nor a concurrent first open can release a handle a request is using.
struct HostFh {
    fh: u64,
    epoch: u64,
    dir: bool,
    conn: Arc<dyn Transport>,
}

impl Drop for HostFh {
    fn drop(&mut self) {
        let fh = self.fh;
        let op = if self.dir {
            Op::Releasedir { fh }
        } else {
            Op::Release { fh }
        };
        // Only on the connection that opened it: elsewhere the number may be another's.
        self.conn.post_on(self.epoch, op);
    }
}

/// An open file as the kernel knows it (outside no-open mode). `host` is opened when
/// the kernel first needs data (read-only opens) or at open, and again after a
/// reconnect; a warm page cache never needs one, so opening a cached file costs no round
/// trip. Directories have no handles: listings find their host handle by where they got
/// to ([`Listings`]).
struct Handle {
    node: u64,
    flags: u32,
    host: Option<Arc<HostFh>>,
    /// Epoch in which data was written and not yet fsynced.
    dirty: Option<u64>,
}

/// What the daemon keeps per node in no-open mode: the host handle for the file's data
/// (read-write where the host allows it) and whether unsynced writes went through it.
#[derive(Default)]
struct NodeData {
    host: Option<Arc<HostFh>>,
    /// Epoch in which data was written and not yet fsynced.
    dirty: Option<u64>,
}

/// Where a directory listing goes on. The kernel's directory handles carry nothing (in
/// no-opendir mode it opens directories without asking; otherwise opendir answers fh 0):
/// listings are told apart by the cookie they reached, which names an entry (docs/
/// PROTOCOL.md §7.7), so any host handle of the directory can continue from it.
enum Next {
    /// The host handle whose listing continues at this cookie.
    Handle(Arc<HostFh>),
    /// The host said the listing ends here.
    End,
}

/// Listings in progress, per directory node.
#[derive(Default)]
struct Listings {
    map: HashMap<u64, Vec<(u64, Next)>>,
    count: usize,
}

/// Listings remembered at once; beyond it all are let go (a listing whose place is
/// forgotten starts a fresh host handle at its cookie, as after a reconnect).
const MAX_LISTINGS: usize = 512;

impl Listings {
    fn take(&mut self, node: u64, cookie: u64) -> Option<Next> {
        let v = self.map.get_mut(&node)?;
        let i = v.iter().position(|(c, _)| *c == cookie)?;
        let (_, next) = v.swap_remove(i);
        if v.is_empty() {
            self.map.remove(&node);
        }
        self.count -= 1;
        Some(next)
    }

    /// Remembers where a listing of `node` got to; returns what was let go (to be
    /// dropped outside the lock: dropping a handle posts its release).
    fn put(&mut self, node: u64, cookie: u64, next: Next) -> Vec<Next> {
        let mut out = Vec::new();
        if self.count >= MAX_LISTINGS {
            out.extend(
                self.map
                    .drain()
                    .flat_map(|(_, v)| v.into_iter().map(|(_, n)| n)),
            );
            self.count = 0;
        }
        let v = self.map.entry(node).or_default();
        if let Some(i) = v.iter().position(|(c, _)| *c == cookie) {
            out.push(std::mem::replace(&mut v[i].1, next));
        } else {
            v.push((cookie, next));
            self.count += 1;
        }
        out
    }

    fn forget(&mut self, node: u64) -> Vec<(u64, Next)> {
        let v = self.map.remove(&node).unwrap_or_default();
        self.count -= v.len();
        v
    }
}

/// Node handles kept at once by default; beyond the cap, unused ones are released.
pub const MAX_NODE_HANDLES: usize = 4096;

#[derive(Default)]
struct Nodes {
    map: HashMap<u64, NodeData>,
    /// Entries of `map` with a host handle.
    open: usize,
}

impl Nodes {
    /// The host handle of `node` if it is valid on connection `epoch`.
    fn current(&self, node: u64, epoch: u64) -> Option<Arc<HostFh>> {
        let h = self.map.get(&node)?.host.as_ref()?;
        (h.epoch == epoch).then(|| h.clone())
    }

    /// Installs `mine` as `node`'s handle unless another caller already installed one
    /// at least as new: returns the handle to use and the one to let go (outside the
    /// lock).
    fn install(&mut self, node: u64, mine: Arc<HostFh>) -> (Arc<HostFh>, Option<Arc<HostFh>>) {
        let d = self.map.entry(node).or_default();
        match &d.host {
            Some(h) if h.epoch >= mine.epoch => (h.clone(), Some(mine)),
            _ => {
                let old = d.host.replace(mine.clone());
                if old.is_none() {
                    self.open += 1;
                }
                (mine, old)
            }
        }
    }

    fn remove(&mut self, node: u64) -> Option<Arc<HostFh>> {
        let h = self.map.remove(&node)?.host;
        if h.is_some() {
            self.open -= 1;
        }
        h
    }

    /// Above `cap` handles, lets go of unused ones (nobody else holds the `Arc`) other
    /// than `keep`'s until a quarter of the room is free again. A handle in use is never
    /// chosen, so it is never released under a request.
    fn evict(&mut self, keep: u64, cap: usize) -> Vec<Arc<HostFh>> {
        if self.open <= cap {
            return Vec::new();
        }
        let target = cap - cap / 4;
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (&node, d) in self.map.iter_mut() {
            if self.open <= target {
                break;
            }
            let unused = matches!(&d.host, Some(h) if Arc::strong_count(h) == 1);
            if node == keep || !unused {
                continue;
            }
            out.extend(d.host.take());
            self.open -= 1;
            if d.dirty.is_none() {
                emptied.push(node);
            }
        }
        for n in emptied {
            self.map.remove(&n);
        }
        out
    }
}

/// How the adapter caches and opens files.
#[derive(Debug, Clone)]
pub struct Options {
    /// Let the kernel cache writes (writeback cache).
    pub writeback: bool,
    /// How long the kernel may remember that a name does not exist; zero disables.
    pub negative_ttl: Duration,
    /// Open files without a round trip (the kernel's no-open mode): data goes through one
    /// host handle per node.
    pub no_open: bool,
    /// In no-open mode, how many node handles to keep at once.
    pub max_node_handles: usize,
    /// Open directories without a round trip (the kernel's no-opendir mode); otherwise
    /// the kernel sends OPENDIR and RELEASEDIR, answered here without the host.
    pub no_opendir: bool,
    /// Read ahead of a tree walk, where a round trip is dear (as over vsock): in no-open
    /// mode, when the kernel first reads a file of a listed directory, the directory's
    /// other small files in one request (if the host offers `read_files`); when a walk
    /// goes down, the first listing page of the next directories (`prelist.rs`).
    pub read_ahead: bool,
    /// Answer creates (with their first bytes) and unlinks at once and send them to the
    /// host behind, in order, many per round trip (`behind.rs`), in no-open mode and
    /// where the host offers `write_behind`.
    pub write_behind: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            writeback: false,
            negative_ttl: Duration::from_secs(60),
            no_open: true,
            max_node_handles: MAX_NODE_HANDLES,
            no_opendir: true,
            read_ahead: false,
            write_behind: false,
        }
    }
}

pub struct HexzFs {
    conn: Arc<dyn Transport>,
    /// Files are opened without a round trip (the kernel's no-open mode): data goes
    /// through per-node host handles.
    no_open: bool,
    /// Directories are opened without a round trip (the kernel's no-opendir mode).
    no_opendir: bool,
    listings: Mutex<Listings>,
    nodes: Mutex<Nodes>,
    max_node_handles: usize,
    writeback: bool,
    negative_ttl: Duration,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// How many entries to ask the host for per READDIRPLUS: about what fitted the
    /// kernel's buffer last time (entries that do not fit are forgotten again).
    dirplus_batch: AtomicU32,
    /// Attributes the host sent, answering the kernel's re-asking (`attrs.rs`).
    attrs: Arc<AttrCache>,
    /// The host refused a read-write open with EROFS: it serves read-only.
    host_read_only: AtomicBool,
    /// Names seen, for removals' victims and names certainly absent (`names.rs`).
    names: Arc<Names>,
    /// Small files read ahead (`ahead.rs`), when on.
    ahead: Option<Arc<Ahead>>,
    /// Directories listed ahead of a walk (`prelist.rs`), when on.
    prelist: Option<Pages>,
    /// Lookups answered from whole listings (`dirlook.rs`), when on.
    dirlook: Option<DirLook>,
    /// Creates and unlinks answered at once (`behind.rs`), when on; it is also `conn`.
    behind: Option<Arc<Behind>>,
    /// What the host's entries say besides the node (TTL in ms << 32 | blksize), for
    /// entries answered early; 0 until one was seen.
    entry_template: AtomicU64,
    /// The session's channel for telling the kernel to drop what it cached (set by
    /// whoever mounts, once the session exists).
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

/// What to do when changes answered early fail on the host (refused, or lost with the
/// connection): this mount stops trusting what it remembers of them — that it knows
/// every name of the directory (its lookups go to the host again, or an unlink the host
/// never got would hide a file it has), the name, and the attributes of the directory
/// and the file — and the kernel is told to drop the entry, the attributes and the
/// cached bytes, so the mount shows what the host has. The kernel is told from a thread
/// of its own: an invalidation waits for the directory's lock, which a request waiting
/// for this very batch may hold.
fn forget_lost(
    behind: &Behind,
    names: Arc<Names>,
    attrs: Arc<AttrCache>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<crate::behind::Lost>();
    let spawned = std::thread::Builder::new()
        .name("hexz-inval".into())
        .spawn(move || {
            for l in rx {
                let Some(n) = notifier.get() else { continue };
                // An error (ENOENT: the kernel holds nothing of it) is as good.
                if let Some(name) = &l.name {
                    let _ = n.inval_entry(INodeNo(l.parent), OsStr::from_bytes(name));
                }
                let _ = n.inval_inode(INodeNo(l.parent), 0, 0);
                if let Some(node) = l.node {
                    let _ = n.inval_inode(INodeNo(node), 0, 0);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread to tell the kernel about failed changes: {e}");
    }
    behind.on_lost(Box::new(move |lost| {
        for l in lost {
            names.not_complete(l.parent);
            if let Some(name) = &l.name {
                names.removed(l.parent, name);
            }
            attrs.invalidate(l.parent);
            if let Some(node) = l.node {
                attrs.invalidate(node);
            }
            let _ = tx.send(l);
        }
    }));
}

/// How long the attributes of a file written early are used (see `written_early`).
const EARLY_WRITE_ATTR_TTL: Duration = Duration::from_secs(1);

/// How many levels below the directories a walk is about to enter are listed ahead too.
const LIST_AHEAD_DEPTH: u32 = 2;

/// The host handle a listing continues on; none for a whole listing read ahead.
type ListingFh = Option<Arc<HostFh>>;
type Pages = Arc<Prelist<ListingFh>>;

/// Listing directories ahead for the kernel's first READDIRPLUS of each (`prelist.rs`):
/// where requests go, where pages go, the entries a page asks for, and the count of
/// changes when the walk asked (a page is used only if it did not move since).
#[derive(Clone)]
struct ListAhead {
    conn: Arc<dyn Transport>,
    pl: Pages,
    want: u32,
    since: u64,
}

impl ListAhead {
    /// Starts listing `dirs` (each with its request number of `pl`), and `depth` levels
    /// of their subdirectories: with `list_dirs`, sent from here where the transport
    /// replies later ([`Transport::call_then`]), else in one job on the read-ahead
    /// threads; without it, one job each.
    fn start(self, dirs: Vec<(u64, u64)>, depth: u32) {
        if dirs.is_empty() {
            return;
        }
        let pl = self.pl.clone();
        if self.conn.has_cap(CAP_LIST_DIRS) {
            if self.conn.replies_later() {
                // Sent from here and taken on the reply thread: no thread waits for it.
                for chunk in dirs.chunks(MAX_LIST_DIRS) {
                    self.clone().ask(chunk.to_vec(), depth);
                }
                return;
            }
            pl.spawn(Box::new(move || self.many(dirs, depth)));
            return;
        }
        for (d, n) in dirs {
            let me = self.clone();
            pl.spawn(Box::new(move || me.one(d, n, depth)));
        }
    }

    /// Sends one `list_dirs` for `dirs` (at most [`MAX_LIST_DIRS`]) without waiting;
    /// the reply goes to [`ListAhead::answered`].
    fn ask(self, dirs: Vec<(u64, u64)>, depth: u32) {
        let op = Op::ListDirs {
            nodes: dirs.iter().map(|&(d, _)| d).collect(),
            max_entries: self.want,
        };
        let conn = self.conn.clone();
        conn.call_then(op, Box::new(move |r| self.answered(dirs, depth, r)));
    }

    /// The reply to [`ListAhead::ask`], on the reply thread, which must not send: the
    /// whole listings are kept here; the rest (directories not answered or not whole,
    /// the next level down, references to give back) goes to a read-ahead thread.
    fn answered(self, dirs: Vec<(u64, u64)>, depth: u32, r: Result<(ReplyBody, u64), CallError>) {
        let nodes: Vec<u64> = dirs.iter().map(|&(d, _)| d).collect();
        let mut kept = Kept::default();
        let mut rest = Vec::new();
        let mut refs = Vec::new();
        match whole_listings(&nodes, r) {
            Ok((got, epoch)) if !got.is_empty() => {
                rest = dirs[got.len()..].to_vec();
                self.keep(&dirs, got, epoch, depth, &mut kept);
            }
            Ok(_) => kept.alone = dirs,
            Err(entries) => {
                refs = entries;
                kept.alone = dirs;
            }
        }
        if rest.is_empty() && refs.is_empty() && kept.is_empty() {
            return;
        }
        let pl = self.pl.clone();
        pl.spawn(Box::new(move || {
            forget_entries(&*self.conn, &refs);
            if !rest.is_empty() {
                self.many(rest, depth);
            }
            self.finish(kept, depth);
        }));
    }

    /// Keeps for the kernel the whole listings `got` (from connection `epoch`) of the
    /// first directories of `ask`, and notes in `kept` what is left to do. Sends nothing.
    fn keep(
        &self,
        ask: &[(u64, u64)],
        got: Vec<Option<Vec<DirEntryPlus>>>,
        epoch: u64,
        depth: u32,
        kept: &mut Kept,
    ) {
        for (&(d, n), entries) in ask.iter().zip(got) {
            let Some(entries) = entries else {
                kept.alone.push((d, n)); // not whole
                continue;
            };
            let subdirs = subdirs_of(&entries);
            let page = Page {
                entries,
                eof: true,
                host: None,
                epoch,
                since: self.since,
            };
            kept.back.extend(self.pl.arrived(d, n, page));
            if depth > 0 {
                kept.deeper.extend(self.pl.deeper(d, &subdirs));
            }
        }
    }

    /// Does what [`ListAhead::keep`] left: gives pages back, lists the directories not
    /// whole alone, and starts the next level down.
    fn finish(self, kept: Kept, depth: u32) {
        for p in kept.back {
            give_back(&*self.conn, p);
        }
        for (d, n) in kept.alone {
            self.one(d, n, depth);
        }
        if depth > 0 {
            self.start(kept.deeper, depth - 1);
        }
    }

    /// Lists directory `d` (request `n`) on a host handle of its own: its first page,
    /// then `depth` levels of its subdirectories.
    fn one(&self, d: u64, n: u64, depth: u32) {
        let op = Op::Opendir {
            node: d,
            list: Some(self.want),
        };
        let (fh, list, epoch) = match self.conn.call_epoch(op) {
            Ok((ReplyBody::Opened { fh, list, .. }, epoch)) => (fh, list, epoch),
            _ => return self.pl.failed(d, n),
        };
        let host = Arc::new(HostFh {
            fh,
            epoch,
            dir: true,
            conn: self.conn.clone(),
        });
        let Some(l) = list else {
            return self.pl.failed(d, n); // the handle goes with `host`
        };
        let subdirs = subdirs_of(&l.entries);
        self.arrived(d, n, l.entries, l.eof, Some(host), epoch);
        if depth > 0 {
            let deeper = self.pl.deeper(d, &subdirs);
            self.clone().start(deeper, depth - 1);
        }
    }

    /// Lists `dirs` with `list_dirs`: many whole listings per round trip and no host
    /// handles; a directory that does not come back whole is listed on a handle of its
    /// own.
    fn many(&self, dirs: Vec<(u64, u64)>, depth: u32) {
        let mut kept = Kept::default();
        let mut left = &dirs[..];
        while !left.is_empty() {
            let ask = &left[..left.len().min(MAX_LIST_DIRS)];
            let nodes: Vec<u64> = ask.iter().map(|&(d, _)| d).collect();
            let Some((got, epoch)) =
                list_dirs(&*self.conn, &nodes, self.want).filter(|(got, _)| !got.is_empty())
            else {
                kept.alone.extend_from_slice(left);
                break;
            };
            let answered = got.len();
            self.keep(ask, got, epoch, depth, &mut kept);
            left = &left[answered..];
        }
        self.clone().finish(kept, depth);
    }

    /// The page of `d` (request `n`) arrived: kept for the kernel, or given back.
    fn arrived(
        &self,
        d: u64,
        n: u64,
        entries: Vec<DirEntryPlus>,
        eof: bool,
        host: ListingFh,
        epoch: u64,
    ) {
        let page = Page {
            entries,
            eof,
            host,
            epoch,
            since: self.since,
        };
        for p in self.pl.arrived(d, n, page) {
            give_back(&*self.conn, p);
        }
    }
}

/// What is left once the listings read ahead are kept ([`ListAhead::keep`]).
#[derive(Default)]
struct Kept {
    /// Directories not listed whole: each to be listed on a host handle of its own.
    alone: Vec<(u64, u64)>,
    /// The next level down, asked for.
    deeper: Vec<(u64, u64)>,
    /// Pages to give back.
    back: Vec<Page<ListingFh>>,
}

impl Kept {
    fn is_empty(&self) -> bool {
        self.alone.is_empty() && self.deeper.is_empty() && self.back.is_empty()
    }
}

/// What `list_dirs` answered: per node, its whole listing or `None`; and the epoch.
type WholeListings = (Vec<Option<Vec<DirEntryPlus>>>, u64);

/// Sends `list_dirs` for `nodes`: for the nodes answered (the first ones, in order),
/// each one's whole listing, or `None` where it is not whole; and the connection that
/// answered. A reply that is not that (a host not keeping to the protocol) is given back
/// and counts as no answer.
fn list_dirs(conn: &dyn Transport, nodes: &[u64], max_entries: u32) -> Option<WholeListings> {
    let op = Op::ListDirs {
        nodes: nodes.to_vec(),
        max_entries,
    };
    match whole_listings(nodes, conn.call_epoch(op)) {
        Ok(w) => Some(w),
        Err(back) => {
            forget_entries(conn, &back);
            None
        }
    }
}

/// What a `list_dirs` reply for `nodes` says (as [`list_dirs`]); if it is no such reply,
/// the entries in it, whose references are to be given back.
fn whole_listings(
    nodes: &[u64],
    r: Result<(ReplyBody, u64), CallError>,
) -> Result<WholeListings, Vec<DirEntryPlus>> {
    let (dirs, epoch) = match r {
        Ok((ReplyBody::Listings { dirs }, epoch)) => (dirs, epoch),
        _ => return Err(Vec::new()),
    };
    let in_order = dirs.len() <= nodes.len() && dirs.iter().zip(nodes).all(|(d, &n)| d.node == n);
    if !in_order {
        return Err(dirs
            .into_iter()
            .flat_map(|d| d.entries.unwrap_or_default())
            .collect());
    }
    Ok((dirs.into_iter().map(|d| d.entries).collect(), epoch))
}

/// The subdirectories named in a listing page (not `.` and `..`).
fn subdirs_of(entries: &[DirEntryPlus]) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e.is_referenced())
        .filter(|e| e.entry.attr.mode & libc::S_IFMT == libc::S_IFDIR)
        .map(|e| e.entry.node)
        .collect()
}

/// Gives back a listing page read ahead and not used: its entries' references (all but
/// `.` and `..`) and, as the last holder lets go, its host handle.
fn give_back(conn: &dyn Transport, page: Page<ListingFh>) {
    forget_entries(conn, &page.entries);
}

/// Gives back the references of listing entries that never reached the kernel.
fn forget_entries(conn: &dyn Transport, entries: &[DirEntryPlus]) {
    let refs: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e.is_referenced())
        .map(|e| (e.entry.node, 1))
        .collect();
    conn.forget(&refs);
}

/// Answers the kernel with an entry reply (caching its attributes is the caller's part).
fn answer_entry(r: Result<ReplyBody, Errno>, reply: ReplyEntry) {
    match r {
        Ok(ReplyBody::Entry(e)) => reply.entry(
            &ttl(e.entry_ttl_ms),
            &attr(&e.attr),
            Generation(e.generation),
        ),
        Ok(_) => reply.error(fuser::Errno::EIO),
        Err(e) => reply.error(fuse_err(e)),
    }
}

fn fuse_err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.sanitized().as_i32())
}

fn ttl(ms: u32) -> Duration {
    Duration::from_millis(ms as u64)
}

fn time(t: Timespec) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs()) + Duration::from_nanos(t.1 as u64)
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(Timespec(d.as_secs() as i64, d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                let (s, n) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                };
                SetTime::At(Timespec(s, n))
            }
        },
    }
}

/// Linux's 32-bit device encoding, as FUSE carries it.
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (
        libc::major(rdev as libc::dev_t),
        libc::minor(rdev as libc::dev_t),
    );
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor) as u64
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: encode_dev(a.rdev),
        blksize: a.blksize,
        flags: 0,
    }
}

/// Requests that may be sent again after a reconnect without changing their effect.
fn idempotent(op: &Op) -> bool {
    matches!(
        op,
        Op::Lookup { .. }
            | Op::Getattr { .. }
            | Op::Readlink { .. }
            | Op::Read { .. }
            | Op::Readdir { .. }
            | Op::Readdirplus { .. }
            | Op::Statfs { .. }
            | Op::Getxattr { .. }
            | Op::Listxattr { .. }
            | Op::Lseek { .. }
            | Op::Open { .. }
            | Op::Opendir { .. }
            | Op::ReadFiles { .. }
            | Op::ListDirs { .. }
    )
}

impl HexzFs {
    pub fn new(conn: Arc<dyn Transport>, opts: Options) -> HexzFs {
        let behind = (opts.write_behind && opts.no_open && conn.has_cap(CAP_WRITE_BEHIND))
            .then(|| Behind::start(conn.clone()));
        // Everything goes through write-behind's barrier (see behind.rs).
        let conn: Arc<dyn Transport> = match &behind {
            Some(b) => b.clone(),
            None => conn,
        };
        let workers = opts.read_ahead.then(|| Workers::start(READ_AHEAD_THREADS));
        let (names, attrs) = (Arc::new(Names::default()), Arc::new(AttrCache::default()));
        let notifier = Arc::new(OnceLock::new());
        if let Some(b) = &behind {
            forget_lost(b, names.clone(), attrs.clone(), notifier.clone());
        }
        HexzFs {
            no_open: opts.no_open,
            no_opendir: opts.no_opendir,
            listings: Mutex::new(Listings::default()),
            nodes: Mutex::new(Nodes::default()),
            max_node_handles: opts.max_node_handles.max(1),
            writeback: opts.writeback,
            negative_ttl: opts.negative_ttl,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            dirplus_batch: AtomicU32::new(DIRPLUS_START),
            attrs,
            host_read_only: AtomicBool::new(false),
            names,
            ahead: workers
                .clone()
                .filter(|_| conn.has_cap(CAP_READ_FILES))
                .map(|w| Ahead::start(conn.clone(), w)),
            dirlook: (workers.is_some() && conn.has_cap(CAP_LIST_DIRS)).then(DirLook::default),
            prelist: workers.map(Prelist::start),
            behind,
            entry_template: AtomicU64::new(0),
            notifier,
            conn,
        }
    }

    /// Where the mounting code puts the session's [`fuser::Notifier`] (before the
    /// session runs), so that the kernel can be told what write-behind got wrong.
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn nodes(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn host_fh(&self, fh: u64, epoch: u64, dir: bool) -> Arc<HostFh> {
        Arc::new(HostFh {
            fh,
            epoch,
            dir,
            conn: self.conn.clone(),
        })
    }

    /// One request; idempotent ones are re-sent once the host is back. Also says on
    /// which connection it was answered (a handle in the reply is valid there only).
    fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), Errno> {
        let again = idempotent(&op);
        for _ in 0..3 {
            match self.conn.call_epoch(op.clone()) {
                Ok(r) => return Ok(r),
                Err(CallError::Errno(e)) => return Err(e),
                Err(CallError::Lost) if !again => return Err(Errno::EIO),
                Err(CallError::Lost) | Err(CallError::Stale) => {}
            }
        }
        Err(Errno::EIO)
    }

    fn call(&self, op: Op) -> Result<ReplyBody, Errno> {
        self.call_epoch(op).map(|(b, _)| b)
    }

    /// The host handle for a node's data (no-open mode), opened read-write (read-only
    /// where the host refuses writes) the first time it is needed or after a reconnect.
    fn node_fh(&self, node: u64) -> Result<Arc<HostFh>, Errno> {
        if let Some(h) = self.nodes().current(node, self.conn.epoch()) {
            return Ok(h);
        }
        if let Some(h) = self.created_fh(node) {
            return Ok(h);
        }
        self.open_node(node, None).map(|(h, _)| h)
    }

    /// True (once) if a change answered early on `node` failed on the host.
    fn behind_failed(&self, node: u64) -> bool {
        self.behind.as_ref().is_some_and(|b| {
            b.barrier();
            b.take_failed(node)
        })
    }

    /// Answers a create at once (`behind.rs`): in a directory whose every name this
    /// mount knows (so the name is free), with a node id the host set aside for this
    /// connection; the host makes the file behind. The attributes are those the host
    /// will give it (its times are sent along).
    fn create_early(
        &self,
        req: &Request,
        parent: u64,
        n: &OsStr,
        mode: u32,
        flags: u32,
    ) -> Option<(Duration, FileAttr)> {
        let b = self.behind.as_ref()?;
        let template = self.entry_template.load(Ordering::Relaxed);
        if template == 0
            || hexz_protocol::check_name(n.as_bytes()).is_err()
            || !self.names.absent(parent, n.as_bytes())
        {
            return None;
        }
        let t = crate::behind::now();
        // The directory's attributes, for its new times and its group: in a set-group-ID
        // directory the file gets the directory's group, as the host will give it.
        let dir_attr = self.dir_attr_at(parent, t)?;
        let gid = match dir_attr.mode & libc::S_ISGID {
            0 => req.gid(),
            _ => dir_attr.gid,
        };
        let (node, epoch) = b.take_id()?;
        let a = Attr {
            ino: node,
            mode: libc::S_IFREG | (mode & 0o7777),
            nlink: 1,
            uid: req.uid(),
            gid,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: template as u32,
            atime: t,
            mtime: t,
            ctime: t,
        };
        let ttl_ms = (template >> 32) as u32;
        let entry = hexz_protocol::Entry {
            node,
            generation: 0,
            attr: a,
            entry_ttl_ms: ttl_ms,
            attr_ttl_ms: ttl_ms,
            dir_attr: Some(dir_attr),
        };
        let since = self.attrs.since();
        self.dir_changed(parent);
        self.note_new_name(parent, n.as_bytes(), &entry, since);
        self.attrs.set_no_caps(node);
        self.note_written(node, FileHandle(0), epoch);
        let op = Op::CreateAs {
            parent,
            name: name(n),
            mode,
            flags,
            uid: a.uid,
            gid: a.gid,
            node,
            data: hexz_protocol::ByteBuf::new(),
        };
        b.create(epoch, op, t, node, parent);
        Some((ttl(ttl_ms), attr(&a)))
    }

    /// A file created early was written early up to `end` (stamped `at` on the host, or
    /// with its create's time): its attributes are what the host will have, but for
    /// the blocks it will use, which are estimated as a file system without holes
    /// counts them, and so are kept only for [`EARLY_WRITE_ATTR_TTL`]: the reads and
    /// `stat`s of a program still writing the file need no round trip, and a later
    /// `stat` gets the host's count.
    fn written_early(&self, node: u64, end: u64, at: Option<Timespec>) {
        let Some((a, left)) = self.attrs.get(node) else {
            return self.attrs.invalidate(node);
        };
        let size = a.size.max(end);
        let block = (a.blksize as u64).max(512);
        let (mtime, ctime) = at.map_or((a.mtime, a.ctime), |t| (t, t));
        let a = Attr {
            size,
            blocks: size.div_ceil(block) * block / 512,
            mtime,
            ctime,
            ..a
        };
        self.attrs.replace(node, &a, left.min(EARLY_WRITE_ATTR_TTL));
    }

    /// A directory's attributes once a file was added or removed at `t` (the host
    /// stamps early changes with the time they were answered): its times change,
    /// nothing else does. `None` unless they are cached.
    fn dir_attr_at(&self, dir: u64, t: Timespec) -> Option<Attr> {
        let (a, _) = self.attrs.get(dir)?;
        Some(Attr {
            mtime: t,
            ctime: t,
            ..a
        })
    }

    /// Answers an unlink at once (`behind.rs`) when this mount knows the name's node
    /// (the kernel has checked the rest); the host removes it behind.
    fn unlink_early(&self, parent: u64, n: &OsStr) -> bool {
        let Some(b) = &self.behind else { return false };
        let t = crate::behind::now();
        if self.names.get(parent, n.as_bytes()).is_none()
            || !b.unlink(self.conn.epoch(), parent, name(n), t)
        {
            return false;
        }
        let ttl_ms = (self.entry_template.load(Ordering::Relaxed) >> 32) as u32;
        let dir_attr = self.dir_attr_at(parent, t);
        let since = self.attrs.since();
        let done = ReplyBody::Ok {
            dir_attr,
            attr_ttl_ms: dir_attr.map(|_| ttl_ms),
        };
        self.note_removal(parent, n, &Ok(done), since, false);
        true
    }

    /// The host handle an early create opened for `node` (`behind.rs`), once applied.
    fn created_fh(&self, node: u64) -> Option<Arc<HostFh>> {
        let b = self.behind.as_ref()?;
        b.barrier();
        let (fh, epoch) = b.take_fh(node)?;
        Some(self.keep_node_fh(node, self.host_fh(fh, epoch, false)))
    }

    /// Opens the node's data handle on the host, reading `read` in the same round trip
    /// when given (the bytes come back if that read succeeded).
    fn open_node(
        &self,
        node: u64,
        read: Option<ReadAt>,
    ) -> Result<(Arc<HostFh>, Option<Vec<u8>>), Errno> {
        let open = |flags: i32| {
            self.call_epoch(Op::Open {
                node,
                flags: flags as u32,
                read,
            })
        };
        // A read-only host refuses read-write opens: after the first refusal, ask for
        // read-only at once.
        let opened = if self.host_read_only.load(Ordering::Relaxed) {
            open(libc::O_RDONLY)
        } else {
            match open(libc::O_RDWR) {
                Err(Errno::EROFS) => {
                    self.host_read_only.store(true, Ordering::Relaxed);
                    open(libc::O_RDONLY)
                }
                Err(Errno::EACCES) | Err(Errno::EPERM) | Err(Errno::EINVAL) => open(libc::O_RDONLY),
                r => r,
            }
        };
        match opened? {
            (ReplyBody::Opened { fh, data, .. }, epoch) => {
                let h = self.keep_node_fh(node, self.host_fh(fh, epoch, false));
                Ok((h, data.map(|d| d.into_vec())))
            }
            _ => Err(Errno::EIO),
        }
    }

    /// Makes `mine` the node's data handle, unless a concurrent first use got there first
    /// (then `mine` is released and theirs used); evicts unused handles above the cap.
    fn keep_node_fh(&self, node: u64, mine: Arc<HostFh>) -> Arc<HostFh> {
        let (use_it, _let_go, _evicted) = {
            let mut nodes = self.nodes();
            let (use_it, let_go) = nodes.install(node, mine);
            let evicted = nodes.evict(node, self.max_node_handles);
            (use_it, let_go, evicted)
        }; // the lock is gone before the releases are sent
        use_it
    }

    /// The host handle of an open file or directory, reopened on the host the first
    /// time it is needed and after a reconnect.
    fn server_fh(&self, fh: u64) -> Result<Arc<HostFh>, Errno> {
        let epoch = self.conn.epoch();
        let (node, flags) = {
            let handles = self.handles();
            let h = handles.get(&fh).ok_or(Errno::EBADF)?;
            if let Some(host) = h.host.as_ref().filter(|x| x.epoch == epoch) {
                return Ok(host.clone());
            }
            (h.node, h.flags)
        };
        let reopen = flags & !((libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL) as u32);
        let op = Op::Open {
            node,
            flags: reopen,
            read: None,
        };
        let mine = match self.call_epoch(op)? {
            (ReplyBody::Opened { fh, .. }, epoch) => self.host_fh(fh, epoch, false),
            _ => return Err(Errno::EIO),
        };
        let mut handles = self.handles();
        let h = handles.get_mut(&fh).ok_or(Errno::EBADF)?;
        match &h.host {
            // A concurrent first use opened one too: use theirs, ours is released.
            Some(theirs) if theirs.epoch >= mine.epoch => Ok(theirs.clone()),
            _ => {
                h.host = Some(mine.clone());
                Ok(mine)
            }
        }
    }

    /// A request on a file's or directory's host handle: the kernel's handle `fh`, or
    /// (fh 0, no-open mode) the node's data handle. The handle is held for the whole
    /// request, and the request only goes on the connection that opened it; after a
    /// reconnect the handle is reopened and an idempotent request sent again.
    fn data_call(
        &self,
        node: u64,
        fh: FileHandle,
        make: impl Fn(u64) -> Op,
    ) -> Result<ReplyBody, Errno> {
        self.data_call_epoch(node, fh, make).map(|(b, _)| b)
    }

    /// As `data_call`, also saying on which connection the request was answered.
    fn data_call_epoch(
        &self,
        node: u64,
        fh: FileHandle,
        make: impl Fn(u64) -> Op,
    ) -> Result<(ReplyBody, u64), Errno> {
        for _ in 0..3 {
            let host = if fh.0 == 0 {
                self.node_fh(node)?
            } else {
                self.server_fh(fh.0)?
            };
            let op = make(host.fh);
            let retry = idempotent(&op);
            match self.conn.call_on(host.epoch, op) {
                Ok(b) => return Ok((b, host.epoch)),
                Err(CallError::Errno(e)) => return Err(e),
                // Not sent: the handle belongs to an earlier connection; reopen it.
                Err(CallError::Stale) => continue,
                Err(CallError::Lost) if retry => continue,
                Err(CallError::Lost) => return Err(Errno::EIO),
            }
        }
        Err(Errno::EIO)
    }

    fn listings(&self) -> MutexGuard<'_, Listings> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A page of a directory listing: continues the host listing that reached
    /// `cookie`, or starts one on a fresh host handle — at
    /// cookie 0 with the first `plus` entries listed in the same round trip. `None`:
    /// the host already said the listing ends at `cookie`.
    fn node_listing_page(
        &self,
        node: u64,
        cookie: u64,
        plus: Option<u32>,
        make: impl Fn(u64) -> Op,
    ) -> Result<Option<(ReplyBody, ListingFh)>, Errno> {
        let epoch = self.conn.epoch();
        let mut held = None;
        if let (0, Some(_), Some(pl)) = (cookie, plus, &self.prelist) {
            if let Some(page) = pl.take(node) {
                // Only if nothing changed since it was asked for, on this connection.
                if page.epoch == epoch && page.since == self.attrs.changes() {
                    tracing::debug!(dir = node, "listing from a page read ahead");
                    let body = ReplyBody::DirPlus {
                        entries: page.entries,
                        eof: page.eof,
                    };
                    return Ok(Some((body, page.host)));
                }
                self.give_back(page);
            }
        }
        if cookie != 0 {
            let found = self.listings().take(node, cookie); // the lock goes here
            match found {
                Some(Next::End) => return Ok(None),
                Some(Next::Handle(h)) if h.epoch == epoch => held = Some(h),
                _ => {}
            }
        }
        for _ in 0..3 {
            let host = match held.take() {
                Some(h) => h,
                None => {
                    let list = plus.filter(|_| cookie == 0);
                    tracing::debug!(dir = node, cookie, "listing on a host handle");
                    match self.call_epoch(Op::Opendir { node, list })? {
                        (
                            ReplyBody::Opened {
                                fh, list: Some(l), ..
                            },
                            e,
                        ) if list.is_some() => {
                            let page = ReplyBody::DirPlus {
                                entries: l.entries,
                                eof: l.eof,
                            };
                            return Ok(Some((page, Some(self.host_fh(fh, e, true)))));
                        }
                        (ReplyBody::Opened { fh, .. }, e) => self.host_fh(fh, e, true),
                        _ => return Err(Errno::EIO),
                    }
                }
            };
            // Listing is idempotent: after a reconnect it goes again on a fresh handle.
            match self.conn.call_on(host.epoch, make(host.fh)) {
                Ok(b) => return Ok(Some((b, Some(host)))),
                Err(CallError::Errno(e)) => return Err(e),
                Err(CallError::Stale) | Err(CallError::Lost) => continue,
            }
        }
        Err(Errno::EIO)
    }

    /// Where a listing got to: the kernel asks next from `cookie`.
    /// An ended listing lets its host handle go.
    /// Without a host handle (a whole listing read ahead) a listing not ended continues
    /// on a fresh one.
    fn listing_reached(&self, node: u64, cookie: u64, ended: bool, host: ListingFh) {
        let next = match (ended, host) {
            (true, host) => {
                drop(host);
                Next::End
            }
            (false, Some(host)) => Next::Handle(host),
            (false, None) => return,
        };
        let let_go = self.listings().put(node, cookie, next);
        drop(let_go);
    }

    /// A name was (or may have been) added to or removed from `dir`: listings in
    /// progress there continue on fresh host handles, which list the directory as it is
    /// now (resuming by name), and no "ended here" of an older listing is trusted.
    fn dir_changed(&self, dir: u64) {
        self.attrs.note_change();
        let gone = self.listings().forget(dir);
        drop(gone);
        if let Some(page) = self.prelist.as_ref().and_then(|pl| pl.forget(dir)) {
            self.give_back(page);
        }
        self.let_go(self.dirlook.as_ref().and_then(|d| d.forget(dir)));
    }

    /// A lookup answered from `parent`'s whole listing (`dirlook.rs`), asking for it if
    /// need be; `None`: send the lookup. `since` becomes the attribute cache's version
    /// when the listing was asked for (what the entry's attributes are cached against).
    fn lookup_listed(
        &self,
        parent: u64,
        name: &[u8],
        since: &mut u64,
    ) -> Option<Result<ReplyBody, Errno>> {
        let dl = self.dirlook.as_ref()?;
        let (answer, back) = dl.lookup(parent, name, self.attrs.changes(), self.conn.epoch());
        self.let_go(back);
        match answer {
            Answer::Entry(e, version) => {
                *since = version;
                Some(Ok(ReplyBody::Entry(e.entry)))
            }
            Answer::Absent => Some(Err(Errno::ENOENT)),
            Answer::Host => None,
            Answer::List => {
                let (version, changes) = (self.attrs.since(), self.attrs.changes());
                let (mut got, epoch) =
                    list_dirs(&*self.conn, &[parent], crate::dirlook::MAX_ENTRIES)?;
                let Some(entries) = got.pop()? else {
                    dl.too_long(parent);
                    return None;
                };
                self.listed_whole(parent, &entries, changes);
                let mut held = Held::new(entries, changes, version, epoch);
                // Fresh: nothing taken yet, so a name it does not give is absent.
                let r = match held.take(name) {
                    Some(e) => Ok(ReplyBody::Entry(e.entry)),
                    None => Err(Errno::ENOENT),
                };
                self.let_go(dl.put(parent, held));
                *since = version;
                Some(r)
            }
        }
    }

    /// `dir`'s whole listing came, asked for when the count of changes through the
    /// mount was `changes`: if none happened since, every name it has is known from now
    /// on (`names.rs`), so other names are answered absent and creates there can be
    /// answered early.
    fn listed_whole(&self, dir: u64, entries: &[DirEntryPlus], changes: u64) {
        if self.attrs.changes() == changes {
            let names = entries.iter().map(|e| (&e.name[..], e.entry.node));
            self.names.listed(dir, names);
        }
    }

    /// Listings held for lookups and given up: their references go back to the host.
    fn let_go(&self, held: impl IntoIterator<Item = Held>) {
        for h in held {
            self.conn.forget(&h.refs());
        }
    }

    /// A listing page read ahead and not used: its entries' references go back to the
    /// host, and its handle is released.
    fn give_back(&self, page: Page<ListingFh>) {
        give_back(&*self.conn, page);
    }

    /// The kernel got a page of `dir`'s listing: if a walk is going down, list the next
    /// directories ahead (`prelist.rs`).
    fn list_ahead(&self, dir: u64, first: bool, entries: &[DirEntryPlus]) {
        let Some(pl) = &self.prelist else { return };
        let subdirs = subdirs_of(entries);
        let want = self.dirplus_batch.load(Ordering::Relaxed);
        let since = self.attrs.changes();
        let (ask, stale) = pl.kernel_listed(dir, first, &subdirs, since);
        for page in stale {
            self.give_back(page);
        }
        let ahead = ListAhead {
            conn: self.conn.clone(),
            pl: pl.clone(),
            want,
            since,
        };
        ahead.start(ask, LIST_AHEAD_DEPTH);
    }

    /// A request that can change `node`'s data is about to be sent, or was answered: a
    /// copy read ahead is not used (`ahead.rs`).
    fn data_changes(&self, node: u64) {
        if let Some(a) = &self.ahead {
            a.changed(node);
        }
    }

    /// Remembers unsynced writes of a file, made on connection `epoch`.
    fn note_written(&self, node: u64, fh: FileHandle, epoch: u64) {
        if fh.0 == 0 {
            let mut nodes = self.nodes();
            nodes
                .map
                .entry(node)
                .or_default()
                .dirty
                .get_or_insert(epoch);
        } else if let Some(h) = self.handles().get_mut(&fh.0) {
            h.dirty.get_or_insert(epoch);
        }
    }

    /// True if writes acknowledged by a host that has since gone away may be lost.
    fn take_lost_writes(&self, node: u64, fh: FileHandle, clear: bool) -> bool {
        let epoch = self.conn.epoch();
        let check = |dirty: &mut Option<u64>| {
            let lost = dirty.is_some_and(|e| e != epoch);
            if clear || lost {
                *dirty = None;
            }
            lost
        };
        if fh.0 == 0 {
            self.nodes()
                .map
                .get_mut(&node)
                .is_some_and(|h| check(&mut h.dirty))
        } else {
            self.handles()
                .get_mut(&fh.0)
                .is_some_and(|h| check(&mut h.dirty))
        }
    }

    /// Gives every lazily opened handle a host handle: called before anything that can
    /// remove a name, so a file unlinked while open stays readable through its handle.
    fn materialize_handles(&self) {
        let lazy: Vec<u64> = self
            .handles()
            .iter()
            .filter(|(_, h)| h.host.is_none())
            .map(|(&fh, _)| fh)
            .collect();
        for fh in lazy {
            if let Err(e) = self.server_fh(fh) {
                tracing::debug!(fh, "opening a lazy handle on the host: {e}");
            }
        }
    }

    fn add_handle(&self, node: u64, flags: u32, host: Option<Arc<HostFh>>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(
            fh,
            Handle {
                node,
                flags,
                host,
                dirty: None,
            },
        );
        fh
    }

    /// The kernel's RELEASE: the host handle goes when its last user is done.
    fn drop_handle(&self, fh: FileHandle, reply: ReplyEmpty) {
        let h = self.handles().remove(&fh.0);
        match h {
            Some(h) => {
                drop(h);
                reply.ok()
            }
            None => reply.error(fuser::Errno::EBADF),
        }
    }

    /// Answers with an entry reply to a request sent at cache version `since`.
    fn reply_entry(&self, since: u64, r: Result<ReplyBody, Errno>, reply: ReplyEntry) {
        if let Ok(ReplyBody::Entry(e)) = &r {
            self.attrs.put(e.node, &e.attr, e.attr_ttl_ms, since);
        }
        answer_entry(r, reply);
    }

    /// A name was added under `parent` by a request sent at cache version `since`;
    /// `note_new_name` caches what the reply says (the new node and the parent).
    fn reply_added_entry(
        &self,
        parent: u64,
        n: &[u8],
        since: u64,
        r: Result<ReplyBody, Errno>,
        reply: ReplyEntry,
    ) {
        self.dir_changed(parent);
        match &r {
            Ok(ReplyBody::Entry(e)) => self.note_new_name(parent, n, e, since),
            _ => self.attrs.invalidate(parent),
        }
        answer_entry(r, reply);
    }

    /// A name was added under `parent` (its mtime and ctime changed); `r` is the new
    /// node's entry.
    fn reply_new_entry(&self, parent: u64, n: &OsStr, op: Op, reply: ReplyEntry) {
        let dir = matches!(op, Op::Mkdir { .. });
        let since = self.attrs.since();
        let r = self.call(op);
        if let Ok(ReplyBody::Entry(e)) = &r {
            self.attrs.set_no_caps(e.node); // a new node (EEXIST otherwise)
            if dir {
                self.names.new_dir(e.node);
            }
        }
        self.reply_added_entry(parent, n.as_bytes(), since, r, reply);
    }

    /// Before the kernel hears that `name` left `parent` (reply `r` to a request sent at
    /// cache version `since`): drops what changed — the victim's and the parent's
    /// attributes, or everything when the victim is unknown — and records the parent's
    /// new attributes when the reply carries them.
    fn note_removal(
        &self,
        parent: u64,
        n: &OsStr,
        r: &Result<ReplyBody, Errno>,
        since: u64,
        dir: bool,
    ) {
        self.dir_changed(parent);
        let Ok(body) = r else {
            return;
        };
        let Some(victim) = self.names.removed(parent, n.as_bytes()) else {
            return self.attrs.invalidate_all();
        };
        if dir {
            self.names.dir_gone(victim);
        }
        self.attrs.invalidate(victim);
        self.attrs.invalidate(parent);
        if let ReplyBody::Ok {
            dir_attr: Some(d),
            attr_ttl_ms: Some(t),
        } = body
        {
            // After this call's own two invalidations (victim and parent).
            self.attrs.put_after_own(parent, d, *t, since, 2);
        }
    }

    /// Before the kernel hears of a name added under `parent` by a request sent at cache
    /// version `since`: the parent's attributes changed (the reply may carry the new
    /// ones), and the entry's node is as the reply says, unless another change raced.
    fn note_new_name(&self, parent: u64, n: &[u8], e: &hexz_protocol::Entry, since: u64) {
        self.entry_template.store(
            (e.entry_ttl_ms as u64) << 32 | e.attr.blksize as u64,
            Ordering::Relaxed,
        );
        self.names.seen(parent, n, e.node);
        self.attrs.invalidate(parent);
        if let Some(d) = &e.dir_attr {
            self.attrs.put_after_own(parent, d, e.attr_ttl_ms, since, 1);
        }
        self.attrs
            .put_after_own(e.node, &e.attr, e.attr_ttl_ms, since, 1);
    }

    fn reply_empty(&self, r: Result<ReplyBody, Errno>, reply: ReplyEmpty) {
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn open_flags(&self, flags: i32) -> u32 {
        // With the writeback cache the kernel does O_APPEND itself, and may read through a
        // write-only descriptor to fill partial pages.
        let mut f = flags;
        if self.writeback {
            f &= !libc::O_APPEND;
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
        }
        f as u32
    }

    fn fopen(&self, keep_cache: bool) -> FopenFlags {
        if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl Filesystem for HexzFs {
    fn destroy(&mut self) {
        // Unmounted: the changes answered early reach the host before the daemon goes.
        if let Some(b) = &self.behind {
            b.barrier();
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let limits = self.conn.limits();
        let _ = config.set_max_write(limits.max_write);
        let _ = config.set_max_readahead(limits.max_read.min(1 << 20));
        let _ = config.set_max_background(64);
        let mut wanted = vec![
            // Every listing page as READDIRPLUS (not only the first, as with
            // FUSE_READDIRPLUS_AUTO): entries of later pages would otherwise each cost a
            // LOOKUP round trip when a tree walk stats or opens them.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_MAX_PAGES,
        ];
        if self.writeback {
            wanted.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        if self.no_open {
            // O_TRUNC must then come as a setattr, so no atomic O_TRUNC in OPEN.
            wanted.push(InitFlags::FUSE_NO_OPEN_SUPPORT);
        } else {
            wanted.push(InitFlags::FUSE_ATOMIC_O_TRUNC);
        }
        if self.no_opendir {
            wanted.push(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        }
        for f in wanted {
            if config.add_capabilities(f).is_err() {
                if f == InitFlags::FUSE_WRITEBACK_CACHE {
                    self.writeback = false;
                }
                if f == InitFlags::FUSE_NO_OPEN_SUPPORT {
                    self.no_open = false;
                }
                if f == InitFlags::FUSE_NO_OPENDIR_SUPPORT {
                    self.no_opendir = false;
                }
                tracing::info!("kernel lacks {f:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        if n.len() > hexz_protocol::name::NAME_MAX {
            // As the host would answer, before "no such name" from what is known here.
            return reply.error(fuser::Errno::ENAMETOOLONG);
        }
        let mut since = self.attrs.since();
        let r = if self.names.absent(parent.0, n.as_bytes()) {
            Err(Errno::ENOENT) // a directory whose every name this mount knows
        } else if let Some(r) = self.lookup_listed(parent.0, n.as_bytes(), &mut since) {
            r
        } else {
            self.call(Op::Lookup {
                parent: parent.0,
                name: name(n),
            })
        };
        if let Ok(ReplyBody::Entry(e)) = &r {
            self.names.seen(parent.0, n.as_bytes(), e.node);
        }
        match r {
            Err(Errno::ENOENT) if !self.negative_ttl.is_zero() => {
                // Node 0 is a negative entry: the kernel remembers the absence for the TTL
                // (and forgets it when this mount creates the name).
                reply.entry(&self.negative_ttl, &attr(&Attr::default()), Generation(0));
            }
            r => self.reply_entry(since, r, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // The kernel dropped the inode: so does the daemon's data handle for it (which
        // would otherwise keep a deleted file's space in use on the host).
        let data_handle = self.nodes().remove(ino.0);
        if let Some(b) = &self.behind {
            b.forgotten(ino.0);
        }
        let listings = self.listings().forget(ino.0);
        self.attrs.forget(ino.0);
        if let Some(a) = &self.ahead {
            a.forget(ino.0);
        }
        if let Some(page) = self.prelist.as_ref().and_then(|pl| pl.forget(ino.0)) {
            self.give_back(page);
        }
        self.let_go(self.dirlook.as_ref().and_then(|d| d.forget(ino.0)));
        drop(data_handle); // released on the host unless a request still holds it
        drop(listings);
        self.conn.forget(&[(ino.0, nlookup)]);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some((a, left)) = self.attrs.get(ino.0) {
            return reply.attr(&left, &attr(&a));
        }
        let since = self.attrs.since();
        match self.call(Op::Getattr {
            node: ino.0,
            fh: None,
        }) {
            Ok(ReplyBody::Attr {
                attr: a,
                attr_ttl_ms,
            }) => {
                self.attrs.put(ino.0, &a, attr_ttl_ms, since);
                reply.attr(&ttl(attr_ttl_ms), &attr(&a))
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
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
        let op = Op::Setattr {
            node: ino.0,
            fh: None,
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        let since = self.attrs.since();
        if size.is_some() {
            self.data_changes(ino.0);
        }
        let r = self.call(op);
        // Listings read ahead before now may hold the old attributes.
        self.attrs.note_change();
        if size.is_some() {
            self.data_changes(ino.0);
        }
        match r {
            Ok(ReplyBody::Attr {
                attr: a,
                attr_ttl_ms,
            }) => {
                // The state after this change, unless another one raced it.
                self.attrs.put(ino.0, &a, attr_ttl_ms, since);
                reply.attr(&ttl(attr_ttl_ms), &attr(&a))
            }
            Ok(_) => {
                self.attrs.invalidate(ino.0);
                reply.error(fuser::Errno::EIO)
            }
            Err(e) => {
                self.attrs.invalidate(ino.0);
                reply.error(fuse_err(e))
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.call(Op::Readlink { node: ino.0 }) {
            Ok(ReplyBody::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::Mknod {
            parent: parent.0,
            name: name(n),
            mode,
            rdev: decode_dev(rdev),
            uid: req.uid(),
            gid: req.gid(),
        };
        self.reply_new_entry(parent.0, n, op, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::Mkdir {
            parent: parent.0,
            name: name(n),
            mode,
            uid: req.uid(),
            gid: req.gid(),
        };
        self.reply_new_entry(parent.0, n, op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        self.materialize_handles();
        if self.unlink_early(parent.0, n) {
            return reply.ok();
        }
        let since = self.attrs.since();
        let r = self.call(Op::Unlink {
            parent: parent.0,
            name: name(n),
        });
        // The parent's times and the victim's link count and ctime changed.
        self.note_removal(parent.0, n, &r, since, false);
        self.reply_empty(r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        self.materialize_handles();
        let since = self.attrs.since();
        let r = self.call(Op::Rmdir {
            parent: parent.0,
            name: name(n),
        });
        self.note_removal(parent.0, n, &r, since, true);
        self.reply_empty(r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let op = Op::Symlink {
            parent: parent.0,
            name: name(link),
            target: target.as_os_str().as_bytes().to_vec(),
            uid: req.uid(),
            gid: req.gid(),
        };
        self.reply_new_entry(parent.0, link, op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.materialize_handles();
        let op = Op::Rename {
            parent: parent.0,
            name: name(n),
            new_parent: newparent.0,
            new_name: name(newname),
            flags: flags.bits(),
        };
        let target_absent = self.names.absent(newparent.0, newname.as_bytes());
        let r = self.call(op);
        self.dir_changed(parent.0);
        self.dir_changed(newparent.0);
        if r.is_ok() {
            // Both parents, the moved node's ctime, a replaced node's link count.
            let exchange = flags.bits() & hexz_protocol::RENAME_EXCHANGE != 0;
            let (moved, replaced) = self.names.renamed(
                (parent.0, n.as_bytes()),
                (newparent.0, newname.as_bytes()),
                exchange,
            );
            match moved {
                Some(m) => {
                    self.attrs.invalidate(m);
                    self.attrs.invalidate(parent.0);
                    self.attrs.invalidate(newparent.0);
                    if let Some(v) = replaced {
                        self.attrs.invalidate(v);
                        if !exchange {
                            self.names.dir_gone(v);
                        }
                    } else if !target_absent {
                        // Maybe a replaced name never seen: its node is unknown.
                        self.attrs.invalidate_all();
                    }
                }
                None => self.attrs.invalidate_all(),
            }
        }
        self.reply_empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let since = self.attrs.since();
        let r = self.call(Op::Link {
            node: ino.0,
            new_parent: newparent.0,
            new_name: name(newname),
        });
        self.reply_added_entry(newparent.0, newname.as_bytes(), since, r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            // ENOSYS = "opened": the kernel stops sending OPEN and RELEASE for files;
            // O_TRUNC then arrives as a setattr, data through the node's host handle.
            return reply.error(fuser::Errno::ENOSYS);
        }
        let flags = self.open_flags(flags.0);
        if flags as i32 & (libc::O_ACCMODE | libc::O_TRUNC) == libc::O_RDONLY {
            // The kernel has checked the node and the permissions; the host handle waits
            // for the first read that misses the page cache.
            let g = self.add_handle(ino.0, flags, None);
            return reply.opened(
                FileHandle(g),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            );
        }
        let truncates = flags as i32 & libc::O_TRUNC != 0;
        if truncates {
            self.data_changes(ino.0);
        }
        let r = self.call_epoch(Op::Open {
            node: ino.0,
            flags,
            read: None,
        });
        if truncates {
            self.data_changes(ino.0);
            // After the host truncated, as for write and fallocate: attributes a getattr
            // fetched while the open was in flight may hold the old size.
            self.attrs.invalidate(ino.0);
        }
        match r {
            Ok((ReplyBody::Opened { fh, keep_cache, .. }, epoch)) => {
                let host = self.host_fh(fh, epoch, false);
                let g = self.add_handle(ino.0, flags, Some(host));
                reply.opened(FileHandle(g), self.fopen(keep_cache));
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let size = size.min(self.conn.limits().max_read);
        if fh.0 == 0 {
            // A file created early and not sent yet: its bytes are all here.
            let early = self.behind.as_ref();
            if let Some(d) = early.and_then(|b| b.read_early(ino.0, offset, size)) {
                return reply.data(&d);
            }
        }
        if fh.0 == 0 && self.nodes().current(ino.0, self.conn.epoch()).is_none() {
            if let Some(a) = &self.ahead {
                // Read ahead with its directory's other small files, or (a first read
                // that missed) ask for those now, beside this file's own round trip.
                if let Some(d) = a.read(ino.0, self.conn.epoch(), offset, size) {
                    return reply.data(&d);
                }
                let epoch = self.conn.epoch();
                a.missed(ino.0, |n| self.nodes().current(n, epoch).is_some());
            }
            // The first read of a file opens its data handle and reads in one round trip.
            if let Ok((_, Some(d))) = self.open_node(ino.0, Some(ReadAt { offset, size })) {
                return reply.data(&d);
            }
        }
        match self.data_call(ino.0, fh, |fh| Op::Read { fh, offset, size }) {
            Ok(ReplyBody::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if fh.0 == 0 {
            if let Some(b) = &self.behind {
                let max = MAX_FIRST_DATA.min(self.conn.limits().max_write as usize);
                if let Some(at) = b.write(ino.0, offset, data, max) {
                    // The first bytes of a file created early go with its create.
                    self.data_changes(ino.0);
                    self.written_early(ino.0, offset + data.len() as u64, at);
                    return reply.written(data.len() as u32);
                }
            }
        }
        let since = self.attrs.since();
        self.data_changes(ino.0);
        let r = self.data_call_epoch(ino.0, fh, |fh| Op::Write {
            fh,
            offset,
            data: data.to_vec(),
        });
        self.data_changes(ino.0);
        self.attrs.invalidate(ino.0);
        if let Ok((
            ReplyBody::Written {
                attr: Some(a),
                attr_ttl_ms: Some(t),
                ..
            },
            _,
        )) = &r
        {
            // The attributes after this write, unless another change raced it (the
            // invalidation just above counts: hence the version from before it).
            self.attrs.put_after_own(ino.0, a, *t, since, 1);
        }
        match r {
            Ok((ReplyBody::Written { size, .. }, epoch)) => {
                self.note_written(ino.0, fh, epoch);
                reply.written(size)
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.no_open {
            // Nothing to do at close (durability is fsync's job): ENOSYS tells the kernel
            // to stop sending flushes, so close() costs no round trip.
            return reply.error(fuser::Errno::ENOSYS);
        }
        // Flush only journals writes made through this handle; with none there is nothing
        // to tell the host (and closing a file must not wait for a host that is away).
        let written = self.handles().get(&fh.0).is_some_and(|h| h.dirty.is_some());
        if !written {
            return reply.ok();
        }
        self.reply_empty(
            self.data_call(ino.0, fh, |fh| Op::Flush {
                fh,
                lock_owner: lock_owner.0,
            }),
            reply,
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == 0 {
            return reply.ok(); // a file created in no-open mode: its data handle is per node
        }
        self.drop_handle(fh, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Writes acknowledged by a host that has since gone away may be lost: say so.
        if self.take_lost_writes(ino.0, fh, false) || self.behind_failed(ino.0) {
            return reply.error(fuser::Errno::EIO);
        }
        match self.data_call(ino.0, fh, |fh| Op::Fsync { fh, datasync }) {
            Ok(_) => {
                self.take_lost_writes(ino.0, fh, true);
                reply.ok()
            }
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir {
            // ENOSYS = "opened": the kernel stops sending OPENDIR and RELEASEDIR, keeps
            // listings in its cache (as FOPEN_CACHE_DIR) and lists with fh 0.
            return reply.error(fuser::Errno::ENOSYS);
        }
        // The same without the mode: listings need no handle of their own.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // The listing's host handle is found by where it got to.
        let page = self.node_listing_page(ino.0, offset, None, |h| Op::Readdir {
            fh: h,
            cookie: offset,
            max_entries: 256,
        });
        match page {
            Ok(None) => reply.ok(), // the end, as the host said last time
            Ok(Some((ReplyBody::Dir { entries, eof }, host))) => {
                let mut all = true;
                let mut last = offset;
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        all = false;
                        break;
                    }
                    self.names.seen(ino.0, &e.name, e.ino); // the node id is the ino
                    last = e.cookie;
                }
                self.listing_reached(ino.0, last, eof && all, host);
                reply.ok()
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let want = self.dirplus_batch.load(Ordering::Relaxed);
        let since = self.attrs.since();
        let changes = self.attrs.changes();
        // The listing's host handle is found by where it got to (at cookie 0 a fresh one
        // lists its first page in the same round trip).
        let r = self.node_listing_page(ino.0, offset, Some(want), |h| Op::Readdirplus {
            fh: h,
            cookie: offset,
            max_entries: want,
        });
        match r {
            Ok(None) => reply.ok(), // the end, as the host said last time
            Ok(Some((ReplyBody::DirPlus { entries, eof }, host))) => {
                if offset == 0 && eof {
                    self.listed_whole(ino.0, &entries, changes);
                }
                let got = entries.len();
                let mut sent = offset;
                // The host gave a reference for each entry but `.` and `..`; those that do
                // not fit the kernel's buffer never reach it, so they are forgotten here
                // (the kernel asks again from the last cookie it received).
                let mut fitted = None;
                let mut unsent = Vec::new();
                let mut kept = Vec::new();
                for (i, e) in entries.into_iter().enumerate() {
                    let full = fitted.is_some()
                        || reply.add(
                            INodeNo(e.entry.node),
                            e.cookie,
                            OsStr::from_bytes(&e.name),
                            &ttl(e.entry.entry_ttl_ms),
                            &attr(&e.entry.attr),
                            Generation(e.entry.generation),
                        );
                    if full {
                        fitted.get_or_insert(i);
                        if e.is_referenced() {
                            unsent.push((e.entry.node, 1));
                        }
                    } else {
                        let en = &e.entry;
                        self.attrs.put(en.node, &en.attr, en.attr_ttl_ms, since);
                        self.names.seen(ino.0, &e.name, en.node);
                        sent = e.cookie;
                        kept.push(e);
                    }
                }
                self.conn.forget(&unsent);
                let listed: Vec<Listed<'_>> = kept
                    .iter()
                    .map(|e| Listed {
                        node: e.entry.node,
                        name: &e.name,
                        mode: e.entry.attr.mode,
                        size: e.entry.attr.size,
                    })
                    .collect();
                if let Some(a) = &self.ahead {
                    a.listed(ino.0, offset == 0, &listed);
                }
                drop(listed);
                self.listing_reached(ino.0, sent, eof && fitted.is_none(), host);
                reply.ok();
                self.dirplus_batch
                    .store(next_dirplus_batch(want, got, fitted), Ordering::Relaxed);
                self.list_ahead(ino.0, offset == 0, &kept);
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok() // directories have no handles (see `opendir`)
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.behind_failed(ino.0) {
            return reply.error(fuser::Errno::EIO);
        }
        // Directories have no handles (see `opendir`): a host handle just for this.
        let r = match self.call_epoch(Op::Opendir {
            node: ino.0,
            list: None,
        }) {
            Ok((ReplyBody::Opened { fh, .. }, e)) => {
                let h = self.host_fh(fh, e, true);
                self.conn
                    .call_on(h.epoch, Op::Fsyncdir { fh: h.fh, datasync })
                    .map_err(|e| match e {
                        CallError::Errno(e) => e,
                        CallError::Lost | CallError::Stale => Errno::EIO,
                    })
            }
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(e),
        };
        self.reply_empty(r, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.call(Op::Statfs { node: ino.0 }) {
            Ok(ReplyBody::Statfs(s)) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = Op::Setxattr {
            node: ino.0,
            name: name(n),
            value: value.to_vec(),
            flags: flags as u32,
        };
        let r = self.call(op);
        self.attrs.xattrs_changed(ino.0);
        self.reply_empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let caps = n.as_bytes() == CAPS_XATTR;
        if caps && self.attrs.has_no_caps(ino.0) {
            return reply.error(fuser::Errno::ENODATA);
        }
        let since = self.attrs.since();
        match self.call(Op::Getxattr {
            node: ino.0,
            name: name(n),
        }) {
            Ok(ReplyBody::Data(v)) => xattr_reply(&v, size, reply),
            Err(Errno::ENODATA) if caps => {
                self.attrs.set_no_caps_since(ino.0, since);
                reply.error(fuser::Errno::ENODATA)
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.call(Op::Listxattr { node: ino.0 }) {
            Ok(ReplyBody::Names { names }) => {
                let mut v = Vec::new();
                for n in names {
                    v.extend_from_slice(&n);
                    v.push(0);
                }
                xattr_reply(&v, size, reply)
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let r = self.call(Op::Removexattr {
            node: ino.0,
            name: name(n),
        });
        self.attrs.xattrs_changed(ino.0);
        self.reply_empty(r, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut flags = self.open_flags(flags);
        if self.no_open {
            // The host handle becomes the node's data handle: make it read-write (the
            // kernel has already checked what this caller may do).
            flags = (flags & !(libc::O_ACCMODE as u32)) | libc::O_RDWR as u32;
        }
        if let Some((t, a)) = self.create_early(req, parent.0, n, mode, flags) {
            return reply.created(
                &t,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            );
        }
        let op = Op::Create {
            parent: parent.0,
            name: name(n),
            mode,
            flags,
            uid: req.uid(),
            gid: req.gid(),
        };
        let since = self.attrs.since();
        let r = self.call_epoch(op);
        self.dir_changed(parent.0);
        match &r {
            Ok((ReplyBody::Created { entry, .. }, _)) => {
                // An existing file opened with O_TRUNC changed (its node was unknown
                // before the reply; a copy that raced it arrives after and is not kept).
                self.data_changes(entry.node);
                self.note_new_name(parent.0, n.as_bytes(), entry, since);
                // Without O_EXCL an existing file may have been opened, capabilities
                // and all. A node created by this call has the ctime the directory got
                // as its mtime; one changed since (a capability set) has a later one.
                let created = entry.dir_attr.is_some_and(|d| d.mtime == entry.attr.ctime);
                if flags as i32 & libc::O_EXCL != 0 || created {
                    self.attrs.set_no_caps(entry.node);
                }
            }
            _ => self.attrs.invalidate(parent.0),
        }
        match r {
            Ok((ReplyBody::Created { entry, fh }, epoch)) if self.no_open => {
                let host = self.host_fh(fh, epoch, false);
                self.keep_node_fh(entry.node, host);
                let (t, a, g) = (
                    ttl(entry.entry_ttl_ms),
                    attr(&entry.attr),
                    Generation(entry.generation),
                );
                reply.created(&t, &a, g, FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Ok((ReplyBody::Created { entry, fh }, epoch)) => {
                let host = self.host_fh(fh, epoch, false);
                let g = self.add_handle(entry.node, flags, Some(host));
                reply.created(
                    &ttl(entry.entry_ttl_ms),
                    &attr(&entry.attr),
                    Generation(entry.generation),
                    FileHandle(g),
                    FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.data_changes(ino.0);
        let r = self.data_call_epoch(ino.0, fh, |fh| Op::Fallocate {
            fh,
            offset,
            length,
            mode: mode as u32,
        });
        self.data_changes(ino.0);
        if let Ok((_, epoch)) = r {
            self.note_written(ino.0, fh, epoch);
        }
        self.attrs.invalidate(ino.0);
        self.reply_empty(r.map(|(b, _)| b), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            return reply.error(fuser::Errno::EINVAL);
        }
        match self.data_call(ino.0, fh, |fh| Op::Lseek {
            fh,
            offset: offset as u64,
            whence: whence as u32,
        }) {
            Ok(ReplyBody::Offset { offset }) => reply.offset(offset as i64),
            Ok(_) => reply.error(fuser::Errno::EIO),
            Err(e) => reply.error(fuse_err(e)),
        }
    }
}

/// The first READDIRPLUS asks for this many entries (about what a 4 KiB buffer holds
/// with short names); later ones follow what fitted.
const DIRPLUS_START: u32 = 32;
const DIRPLUS_MIN: u32 = 8;
const DIRPLUS_MAX: u32 = 1024;

/// Entries to ask for next time, after asking for `want`, getting `got`, and the kernel's
/// buffer filling up after `fitted` of them (None: all fitted).
fn next_dirplus_batch(want: u32, got: usize, fitted: Option<usize>) -> u32 {
    let n = match fitted {
        // A little more than fitted, since names differ in length.
        Some(n) => n as u32 + n as u32 / 8 + 1,
        // Everything fitted and there is more: the buffer may take more.
        None if got >= want as usize => want.saturating_mul(2),
        None => want,
    };
    n.clamp(DIRPLUS_MIN, DIRPLUS_MAX)
}

/// getxattr/listxattr: a size probe (0) gets the length; too small a buffer is ERANGE.
fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(fuser::Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_survive_the_fuse_encoding() {
        for (maj, min) in [(1, 3), (8, 1), (259, 65537), (4095, 255)] {
            let dev = libc::makedev(maj, min) as u64;
            assert_eq!(decode_dev(encode_dev(dev)), dev, "{maj}:{min}");
        }
    }

    #[test]
    fn times_before_the_epoch_round_trip() {
        for t in [
            Timespec(0, 0),
            Timespec(1_700_000_000, 123),
            Timespec(-5, 500_000_000),
        ] {
            assert_eq!(set_time(TimeOrNow::SpecificTime(time(t))), SetTime::At(t));
        }
    }

    #[test]
    fn listings_are_found_by_node_and_cookie_and_counted_exactly() {
        let mut l = Listings::default();
        assert!(l.put(7, 100, Next::End).is_empty());
        assert!(l.put(7, 200, Next::End).is_empty());
        assert!(l.put(8, 100, Next::End).is_empty());
        assert_eq!(l.count, 3);
        // The same place again replaces what was there (given back to be dropped).
        assert_eq!(l.put(7, 100, Next::End).len(), 1);
        assert_eq!(l.count, 3);
        assert!(matches!(l.take(7, 100), Some(Next::End)));
        assert!(l.take(7, 100).is_none(), "taken once");
        assert!(l.take(9, 100).is_none());
        assert_eq!(l.count, 2);
        assert_eq!(l.forget(7).len(), 1);
        assert_eq!(l.count, 1);
        assert!(l.forget(7).is_empty());
        assert_eq!(l.forget(8).len(), 1);
        assert_eq!(l.count, 0);
        // Beyond the bound everything is let go, and the new place is kept.
        for c in 0..MAX_LISTINGS as u64 {
            l.put(1, c + 1000, Next::End);
        }
        assert_eq!(l.count, MAX_LISTINGS);
        let gone = l.put(2, 5, Next::End);
        assert_eq!(gone.len(), MAX_LISTINGS);
        assert_eq!(l.count, 1);
        assert!(matches!(l.take(2, 5), Some(Next::End)));
        assert_eq!(l.count, 0);
        assert!(l.map.is_empty());
    }

    #[test]
    fn readdirplus_asks_for_about_what_fitted_last_time() {
        // 26 of 32 fitted: ask for a few more than 26 next time.
        assert_eq!(next_dirplus_batch(32, 32, Some(26)), 30);
        // All fitted and there may be more: ask for more.
        assert_eq!(next_dirplus_batch(32, 32, None), 64);
        // End of the directory: no news.
        assert_eq!(next_dirplus_batch(32, 5, None), 32);
        assert_eq!(next_dirplus_batch(1024, 1024, None), DIRPLUS_MAX);
        assert_eq!(next_dirplus_batch(32, 32, Some(1)), DIRPLUS_MIN);
    }
}
