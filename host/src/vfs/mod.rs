//! The VFS core: the snapshot (read-only lower layer) merged with the overlay (every
//! change), with local-filesystem semantics. Every front end (protocol server, host
//! mount, commit, tests) calls this and only translates.
//!
//! Node ids are stable: snapshot nodes are `index + 1` (root = 1), new nodes get ids
//! from a journaled counter, and nothing is ever renumbered. Names from callers are
//! checked by `hexz_protocol::check_name`; nodes and handles are looked up in maps, so no
//! caller-supplied value is ever used as a host path. Every call names its `owner` (a
//! connection, a mount): handles and lookup references belong to it.
//!
//! Lock order (a thread may only take locks in this order, and never two of one kind):
//! 1. one per-node data lock (`node_lock`: serializes a file's writes and truncations);
//! 2. `inner` (the merged namespace and metadata; read for lookups, write for changes);
//! 3. at most one leaf lock at a time — `refs`, `handles`, `files`, `listings`, `dirty`,
//!    `orphan_since`, `upper_sizes` — held only to copy something in or out, never
//!    across I/O or another lock.
//!
//! No file data I/O and no fsync happens under `inner`: data moves under the node's data
//! lock only, and syncs are group commits (`sync.rs`) outside every lock. Journal
//! appends (buffered writes of a few hundred bytes) happen under `inner` so that a
//! change and its record are one step; compaction, rare and amortized, does too.
//!
//! Durability: a journal record never points at file data that is not yet durable. A
//! file's data state (its size and which ranges its upper file holds) is journaled only
//! by `fsync` of that file, after its upper file is synced, or at clean shutdown (and by
//! compaction, which syncs first). Every other record that names the file (chmod, link,
//! rename…) carries the size it had at its last journaled data state. So a journal sync,
//! whoever triggers it, can never make metadata durable that outruns another file's
//! unsynced data; after a power cut a file is at its last fsynced state or later.

mod attrs;
mod data;
pub mod handles;
mod names;
mod open;
mod refs;
mod sync;
mod xattr;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hexz_protocol::{Errno, Timespec};

use crate::error::Error;
use crate::overlay::journal::{Kind, NodeRec, Record};
use crate::overlay::Overlay;
use crate::snapshot::{NodeKind, Snapshot};
use handles::{Handles, Listing};
use refs::Refs;
use sync::GroupSync;

pub use attrs::SetAttr;

pub type VfsResult<T> = Result<T, Errno>;

/// The root directory's node id.
pub const ROOT: u64 = crate::snapshot::ROOT_ID;
pub const BLOCK: u64 = 4096;
const NODE_LOCKS: usize = 64;

/// A directory's children: (name, node id), sorted by name.
pub type Children = Vec<(Vec<u8>, u64)>;
pub use crate::overlay::journal::XattrList as Xattrs;

/// A node as `export_node` gives it: record, xattrs, children (directories).
pub type ExportedNode = (NodeRec, Xattrs, Option<Children>);

/// One directory entry as `readdir` returns it.
#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: Vec<u8>,
    pub node: u64,
    pub kind: u32,
    pub cookie: u64,
}

/// Options of the core beyond the snapshot and overlay.
#[derive(Clone, Debug, Default)]
pub struct VfsOptions {
    pub read_only: bool,
    /// Bytes the overlay (upper files + journal) may take; past it changes get ENOSPC.
    pub overlay_size: Option<u64>,
}

/// Counts for operators and tests (`live_nodes`: nodes something references).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfsStats {
    pub live_nodes: usize,
    pub handles: usize,
    pub orphans: usize,
    pub overlay_bytes: u64,
}

pub(crate) struct Inner {
    pub(crate) overlay: Overlay,
    /// Data written but not yet journaled (present ranges; size and times live in memory).
    pending_present: HashMap<u64, Vec<(u64, u64)>>,
    /// For nodes with unjournaled data changes: (size, lower_limit) as last journaled.
    durable: HashMap<u64, (u64, u64)>,
}

pub struct Vfs {
    snap: Arc<Snapshot>,
    read_only: bool,
    data_dir: PathBuf,
    inner: RwLock<Inner>,
    refs: Mutex<Refs>,
    handles: Mutex<Handles>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// Listings of changed directories, shared by the handles that saw the same version.
    listings: Mutex<HashMap<u64, handles::Entries>>,
    /// Files written since their last fsync (synced at shutdown).
    dirty: Mutex<HashSet<u64>>,
    /// Nameless nodes kept for reconnecting clients, and since when (see `refs.rs`).
    orphan_since: Mutex<HashMap<u64, std::time::Instant>>,
    node_locks: Vec<Mutex<()>>,
    /// Upper files created so far (each a new entry in the data directory)...
    data_dir_changes: AtomicU64,
    /// ...and how many of those entries are durable.
    data_dir_sync: GroupSync,
    journal_sync: GroupSync,
    overlay_size: Option<u64>,
    upper_bytes: AtomicU64,
    /// Last known allocated bytes of each upper file (for `upper_bytes`).
    upper_sizes: Mutex<HashMap<u64, u64>>,
    journal_len: AtomicU64,
    fs_id: Vec<u8>,
}

/// The one place host errors become errno values for the VFS's callers.
pub fn errno_of(e: &Error) -> Errno {
    match e {
        Error::Io { err, .. } => Errno::from_io(err),
        Error::At { err, .. } => errno_of(err),
        Error::NotFound(_) => Errno::ENOENT,
        Error::Invalid(_) => Errno::EINVAL,
        Error::TooLarge(m) => {
            tracing::warn!("refused: {m}");
            Errno::EFBIG
        }
        Error::NoSpace(_) => Errno::ENOSPC,
        Error::Remote(m) => {
            tracing::error!("registry read failed, returning EIO: {m}");
            Errno::EIO
        }
        Error::Corrupt(_)
        | Error::CorruptOverlay(_)
        | Error::NotASnapshot
        | Error::UnsupportedVersion(_) => {
            tracing::error!("failed verification: {e}");
            Errno::EIO
        }
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_io(&e)
}

thread_local! {
    /// The time changes made on this thread are stamped with, instead of the clock's.
    static CLOCK: std::cell::Cell<Option<(i64, u32)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every time it takes from the clock being `t` (a `batch` request made
/// at the client's time `t`: docs/PROTOCOL.md §7.1).
pub fn at_time<T>(t: (i64, u32), f: impl FnOnce() -> T) -> T {
    let before = CLOCK.with(|c| c.replace(Some(t)));
    let r = f();
    CLOCK.with(|c| c.set(before));
    r
}

pub(crate) fn now() -> (i64, u32) {
    if let Some(t) = CLOCK.with(|c| c.get()) {
        return t;
    }
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn ts(t: (i64, u32)) -> Timespec {
    Timespec(t.0, t.1)
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

fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u64::from_le_bytes(b) ^ std::process::id() as u64 ^ now().1 as u64
}

impl Vfs {
    /// Serves `snap` merged with the overlay in `overlay_dir` (created if missing), or an
    /// ephemeral overlay when `None`. `read_only` refuses every change with EROFS.
    pub fn new(
        snap: Arc<Snapshot>,
        overlay_dir: Option<&Path>,
        read_only: bool,
    ) -> crate::Result<Vfs> {
        Self::with_options(
            snap,
            overlay_dir,
            VfsOptions {
                read_only,
                ..VfsOptions::default()
            },
        )
    }

    pub fn with_options(
        snap: Arc<Snapshot>,
        overlay_dir: Option<&Path>,
        opts: VfsOptions,
    ) -> crate::Result<Vfs> {
        if !snap.has_tree() {
            return Err(Error::Invalid(format!(
                "{}: snapshot has no file tree to serve (stream-only)",
                snap.path().display()
            )));
        }
        let overlay = Overlay::open(&snap, overlay_dir, opts.read_only)?;
        let mut h = blake3::Hasher::new();
        h.update(&snap.id());
        h.update(&overlay.id);
        let fs_id = h.finalize().as_bytes()[..16].to_vec();
        let upper_bytes = if opts.read_only {
            0
        } else {
            overlay.upper_bytes_on_disk()
        };
        let journal_len = overlay.journal_len();
        let started = std::time::Instant::now();
        let orphan_since = overlay
            .orphans()
            .into_iter()
            .map(|id| (id, started))
            .collect();
        Ok(Vfs {
            snap,
            read_only: opts.read_only,
            data_dir: overlay.data_dir(),
            inner: RwLock::new(Inner {
                overlay,
                pending_present: HashMap::new(),
                durable: HashMap::new(),
            }),
            refs: Mutex::new(Refs::default()),
            handles: Mutex::new(Handles::new(random_u64())),
            files: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            orphan_since: Mutex::new(orphan_since),
            node_locks: (0..NODE_LOCKS).map(|_| Mutex::new(())).collect(),
            data_dir_changes: AtomicU64::new(0),
            data_dir_sync: GroupSync::default(),
            journal_sync: GroupSync::default(),
            overlay_size: opts.overlay_size,
            upper_bytes: AtomicU64::new(upper_bytes),
            upper_sizes: Mutex::new(HashMap::new()),
            journal_len: AtomicU64::new(journal_len),
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

    pub fn stats(&self) -> VfsStats {
        let orphans = self.state().overlay.orphans().len();
        VfsStats {
            live_nodes: self.refs().live_nodes(),
            handles: self.handles().len(),
            orphans,
            overlay_bytes: self.overlay_used(),
        }
    }

    // ---- locks (see the order at the top of this file) ----

    pub(crate) fn state(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> VfsResult<RwLockWriteGuard<'_, Inner>> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        Ok(self.inner.write().unwrap_or_else(|p| p.into_inner()))
    }

    fn refs(&self) -> MutexGuard<'_, Refs> {
        self.refs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files_lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<File>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn orphan_since(&self) -> MutexGuard<'_, HashMap<u64, std::time::Instant>> {
        self.orphan_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dirty(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node_lock(&self, node: u64) -> MutexGuard<'_, ()> {
        let i = (node as usize).wrapping_mul(0x9E37_79B9) % NODE_LOCKS;
        self.node_locks[i].lock().unwrap_or_else(|p| p.into_inner())
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
        let idx = self.snap.node_index(id).ok_or(Errno::ESTALE)?;
        let n = self.snap.node(idx).ok_or(Errno::ESTALE)?;
        let (kind, size, parent) = match &n.kind {
            NodeKind::Dir(d) => (Kind::Dir, 0, self.snap.node_id(d.parent)),
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
            size,
            lower_limit: size,
            parent,
            upper: false,
        })
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
        Ok(self.snap.lookup(idx, name).map(|i| self.snap.node_id(i)))
    }

    /// The directory's children now, shared rather than copied where possible.
    fn listing(&self, inner: &Inner, dir: u64) -> VfsResult<Listing> {
        if let Some(listing) = inner.overlay.state.dirs.get(&dir) {
            let mut cache = self.listings.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = cache.get(&dir) {
                return Ok(Listing::Upper(l.clone()));
            }
            if cache.len() >= 1024 {
                cache.retain(|_, l| Arc::strong_count(l) > 1);
            }
            let l = Arc::new(listing.iter().map(|(k, v)| (k.clone(), *v)).collect());
            cache.insert(dir, Arc::clone(&l));
            return Ok(Listing::Upper(l));
        }
        let rec = self.dir_rec(inner, dir)?;
        match rec.lower.and_then(|i| self.snap.node(i)).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => Ok(Listing::Lower(rec.lower.unwrap_or_default())),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// Entry `i` of a listing.
    fn listing_entry<'a>(&'a self, l: &'a Listing, i: usize) -> Option<(&'a [u8], u64)> {
        match l {
            Listing::Upper(v) => v.get(i).map(|(n, id)| (n.as_slice(), *id)),
            Listing::Lower(idx) => match self.snap.node(*idx).map(|n| &n.kind) {
                Some(NodeKind::Dir(d)) => d
                    .entries
                    .get(i)
                    .map(|e| (e.name.as_slice(), self.snap.node_id(e.node))),
                _ => None,
            },
        }
    }

    fn is_empty_dir(&self, inner: &Inner, dir: u64) -> VfsResult<bool> {
        if let Some(listing) = inner.overlay.state.dirs.get(&dir) {
            return Ok(listing.is_empty());
        }
        let l = self.listing(inner, dir)?;
        Ok(self.listing_entry(&l, 0).is_none())
    }

    fn dir_rec(&self, inner: &Inner, dir: u64) -> VfsResult<NodeRec> {
        let rec = self.rec(inner, dir)?;
        if rec.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(rec)
    }

    /// Journals `records` as one atomic step and applies them. Node records of files with
    /// unjournaled data changes are journaled with their last journaled size (see the top
    /// of this file); the live size stays in memory.
    pub(crate) fn commit(&self, inner: &mut Inner, mut records: Vec<Record>) -> VfsResult<()> {
        let mut dirs = Vec::new();
        changed_dirs(&records, &mut dirs);
        let mut live = Vec::new();
        if !inner.durable.is_empty() {
            durable_sizes(&mut records, &inner.durable, &mut live);
        }
        let live: Vec<_> = live
            .into_iter()
            .map(|(id, size, limit)| {
                let present = inner.overlay.state.present.get(&id).cloned();
                (id, size, limit, present)
            })
            .collect();
        inner
            .overlay
            .commit(records, &self.snap)
            .map_err(|e| errno_of(&e))?;
        for (id, size, limit, present) in live {
            if let Some(r) = inner.overlay.state.nodes.get_mut(&id) {
                r.size = size;
                r.lower_limit = limit;
            }
            if let Some(p) = present {
                inner.overlay.state.present.insert(id, p);
            }
        }
        if !dirs.is_empty() {
            let mut cache = self.listings.lock().unwrap_or_else(|p| p.into_inner());
            for d in dirs {
                cache.remove(&d);
            }
        }
        self.after_append(inner);
        Ok(())
    }

    /// Compacts the journal when it has outgrown the live state; tracks its size. The
    /// checkpoint holds every file's live data state, so their data is synced first (the
    /// one place file data is synced under the state lock: rare, amortized).
    fn after_append(&self, inner: &mut Inner) {
        let compacted = if inner.overlay.compaction_due() {
            match self.sync_dirty_files() {
                Ok(()) => inner.overlay.compact_if_large(),
                Err(e) => Err(e),
            }
        } else {
            Ok(false)
        };
        match compacted {
            Ok(true) => {
                // A checkpoint is durable when written: every pending sync is covered.
                if let Some((p, _)) = inner.overlay.sync_point() {
                    self.journal_sync.mark(p);
                }
                inner.pending_present.clear();
                inner.durable.clear();
                tracing::info!(
                    bytes = inner.overlay.journal_len(),
                    "overlay journal compacted"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("compacting the overlay journal: {e}"),
        }
        self.journal_len
            .store(inner.overlay.journal_len(), Ordering::Relaxed);
    }

    fn drop_node(&self, inner: &mut Inner, id: u64) -> VfsResult<()> {
        self.files_lock().remove(&id);
        self.dirty().remove(&id);
        inner.pending_present.remove(&id);
        inner.durable.remove(&id);
        if let Some(b) = self
            .upper_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        {
            self.upper_bytes.fetch_sub(
                b.min(self.upper_bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        inner.overlay.drop_node(id).map_err(|e| errno_of(&e))?;
        self.after_append(inner);
        Ok(())
    }

    /// Bytes the overlay takes now (upper files' allocated blocks + journal).
    fn overlay_used(&self) -> u64 {
        self.upper_bytes.load(Ordering::Relaxed) + self.journal_len.load(Ordering::Relaxed)
    }

    /// ENOSPC when `extra` more bytes would take the overlay past `--overlay-size`.
    fn check_space(&self, extra: u64) -> VfsResult<()> {
        match self.overlay_size {
            Some(limit) if self.overlay_used().saturating_add(extra) > limit => {
                tracing::debug!(limit, "overlay size limit reached");
                Err(Errno::ENOSPC)
            }
            _ => Ok(()),
        }
    }

    /// A node's full record, its xattrs and, for a directory, its children: for
    /// exporting the merged tree (`commit`).
    pub fn export_node(&self, id: u64) -> VfsResult<ExportedNode> {
        let inner = self.state();
        let rec = self.rec(&inner, id)?;
        let xattrs = self.xattrs_of(&inner, &rec);
        let listing = if rec.kind == Kind::Dir {
            let l = self.listing(&inner, id)?;
            let mut v = Vec::new();
            let mut i = 0;
            while let Some((n, c)) = self.listing_entry(&l, i) {
                v.push((n.to_vec(), c));
                i += 1;
            }
            Some(v)
        } else {
            None
        };
        Ok((rec, xattrs, listing))
    }

    /// Makes the overlay durable and compact: every written upper file and the data
    /// directory are synced, pending metadata journaled and synced, then the journal is
    /// rewritten as a checkpoint. An ephemeral overlay is deleted instead.
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
        self.sync_dirty_files()?;
        let ids: Vec<u64> = inner.pending_present.keys().copied().collect();
        for id in ids {
            let records = self.take_data_records(&mut inner, id);
            if !records.is_empty() {
                inner.overlay.commit(records, &self.snap)?;
            }
        }
        inner.overlay.sync()?;
        inner.overlay.checkpoint()
    }

    /// Syncs every upper file written since its last sync, then the data directory.
    fn sync_dirty_files(&self) -> crate::Result<()> {
        let dirty: Vec<u64> = self.dirty().drain().collect();
        for (i, &id) in dirty.iter().enumerate() {
            let path = self.data_dir.join(format!("{id:016x}"));
            let r = match File::open(&path) {
                Ok(f) => f.sync_all(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                self.dirty().extend(&dirty[i..]);
                return Err(Error::io(&path, e));
            }
        }
        File::open(&self.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.data_dir, e))
    }
}

/// Replaces the size of nodes with unjournaled data changes by their last journaled one,
/// collecting the live values to restore in memory.
fn durable_sizes(
    records: &mut [Record],
    durable: &HashMap<u64, (u64, u64)>,
    live: &mut Vec<(u64, u64, u64)>,
) {
    for r in records {
        match r {
            Record::Node(n) => {
                if let Some(&(size, limit)) = durable.get(&n.id) {
                    live.push((n.id, n.size, n.lower_limit));
                    n.size = size;
                    n.lower_limit = limit;
                }
            }
            Record::Batch(v) => durable_sizes(v, durable, live),
            _ => {}
        }
    }
}

/// Directories whose listing `records` change.
fn changed_dirs(records: &[Record], out: &mut Vec<u64>) {
    for r in records {
        match r {
            Record::Entry { dir, .. } => out.push(*dir),
            Record::Dir { id, .. } | Record::DirPart { id, .. } | Record::Drop { id } => {
                out.push(*id)
            }
            Record::Batch(v) => changed_dirs(v, out),
            _ => {}
        }
    }
}
